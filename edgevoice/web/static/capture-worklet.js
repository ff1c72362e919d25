// Capture worklet: mono input at the context's rate -> 16 kHz -> 20 ms frames
// (320 samples) posted to the page. The audio thread only resamples and copies.
import { Resampler } from "./resampler.js";

const FRAME = 320;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, 16000);
    this.frame = new Float32Array(FRAME);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      const out = this.resampler.process(input[0]);
      for (let i = 0; i < out.length; i++) {
        this.frame[this.filled++] = out[i];
        if (this.filled === FRAME) {
          this.port.postMessage(this.frame, [this.frame.buffer]);
          this.frame = new Float32Array(FRAME);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("edgevoice-capture", CaptureProcessor);
