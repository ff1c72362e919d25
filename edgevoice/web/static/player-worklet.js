// Player worklet: the downlink jitter buffer, on the audio thread.
//   {type:"push", samples}  reply audio at the context's rate, in order
//   {type:"end"}            the reply is complete: play what is left, even below prefill
//   {type:"flush", id}      drop everything now (interrupt); answered {type:"flushed"}
// It waits for `prefillMs` of audio before starting (and after an underrun), keeps at
// most `maxMs` (dropping the oldest, counted), and reports when it starts and stops.

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.prefill = Math.round(((opts.prefillMs ?? 60) / 1000) * sampleRate);
    this.max = Math.round(((opts.maxMs ?? 30000) / 1000) * sampleRate);
    this.chunks = [];
    this.offset = 0;          // read position in chunks[0]
    this.buffered = 0;        // samples waiting
    this.playing = false;
    this.ended = false;
    this.underruns = 0;
    this.starved = false;
    this.dropped = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "push") {
      this.chunks.push(msg.samples);
      this.buffered += msg.samples.length;
      this.ended = false;
      while (this.buffered > this.max && this.chunks.length > 1) {
        const gone = this.chunks.shift();
        this.buffered -= gone.length - this.offset;
        this.dropped += gone.length - this.offset;
        this.offset = 0;
      }
    } else if (msg.type === "end") {
      this.ended = true;
      this.starved = false;
    } else if (msg.type === "flush") {
      const dropped = this.buffered;
      this.chunks = [];
      this.offset = 0;
      this.buffered = 0;
      this.ended = false;
      this.starved = false;
      this.setPlaying(false);
      // currentFrame: the first frame of the next block, which is silent
      this.port.postMessage({ type: "flushed", id: msg.id, frame: currentFrame, dropped });
    }
  }

  setPlaying(playing) {
    if (playing !== this.playing) {
      this.playing = playing;
      this.port.postMessage({ type: "state", playing, frame: currentFrame,
        underruns: this.underruns, dropped: this.dropped });
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.prefill || this.ended)) {
      // ran dry before the reply ended, and more came: that was an underrun
      if (this.starved) this.underruns += 1;
      this.starved = false;
      this.setPlaying(true);
    }
    let i = 0;
    if (this.playing) {
      while (i < out.length && this.chunks.length > 0) {
        const chunk = this.chunks[0];
        const n = Math.min(out.length - i, chunk.length - this.offset);
        out.set(chunk.subarray(this.offset, this.offset + n), i);
        i += n;
        this.offset += n;
        this.buffered -= n;
        if (this.offset >= chunk.length) { this.chunks.shift(); this.offset = 0; }
      }
      if (this.buffered === 0) {
        this.starved = !this.ended;
        this.setPlaying(false);
      }
    }
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}

registerProcessor("edgevoice-player", PlayerProcessor);

// The tap: passes its input through unchanged and, while recording, posts what
// went by with the frame it started at. The page's output graph runs through it.
class TapProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.recording = false;
    this.port.onmessage = (event) => { this.recording = event.data.type === "start"; };
  }

  process(inputs, outputs) {
    const input = inputs[0];
    const output = outputs[0];
    const mono = input && input.length > 0 ? input[0] : null;
    for (let c = 0; c < output.length; c++) {
      if (mono) output[c].set(mono); else output[c].fill(0);
    }
    if (this.recording) {
      const copy = mono ? Float32Array.from(mono) : new Float32Array(output[0].length);
      this.port.postMessage({ frame: currentFrame, samples: copy }, [copy.buffer]);
    }
    return true;
  }
}

registerProcessor("edgevoice-tap", TapProcessor);
