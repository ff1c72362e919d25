// The browser device: microphone -> 16 kHz 20 ms frames -> Opus (WebCodecs) ->
// relay; relay -> Opus decode -> jitter buffer worklet -> speaker. Push-to-talk,
// interrupt, hands-free (energy detector), transcripts, link state and RTT.
import { Flags, parseTicket } from "./protocol.js";
import { Link, LinkState } from "./link.js";
import { EnergyDetector } from "./detector.js";
import { Resampler } from "./resampler.js";

const SOFTWARE = "edgevoice-web/1";
const FRAME_SAMPLES = 320;           // 20 ms at 16 kHz
const MAX_TURN_FRAMES = 1500;        // 30 s
const MAX_CONCEALED_FRAMES = 5;
const AWAIT_REPLY_MS = 15000;
const STATS_INTERVAL_MS = 30000;     // as the daemon: the relay's fleet view       // hands-free listens again if no answer comes
const ENCODER_CONFIG = {
  codec: "opus", sampleRate: 16000, numberOfChannels: 1, bitrate: 24000,
  opus: { frameDuration: 20000, application: "voip" },
};
const DECODER_CONFIG = { codec: "opus", sampleRate: 24000, numberOfChannels: 1 };

const $ = (id) => document.getElementById(id);

/** What this browser lacks for being a device; empty when it has everything. */
export async function missingFeatures() {
  const missing = [];
  if (!window.isSecureContext) {
    missing.push("a secure context (open the page over https://, or on localhost)");
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    missing.push("microphone access (getUserMedia)");
  }
  if (typeof AudioWorkletNode === "undefined") missing.push("AudioWorklet");
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") {
    missing.push("WebCodecs audio (AudioEncoder / AudioDecoder)");
  } else {
    try {
      const enc = await AudioEncoder.isConfigSupported(ENCODER_CONFIG);
      const dec = await AudioDecoder.isConfigSupported(DECODER_CONFIG);
      if (!enc.supported) missing.push("Opus encoding in WebCodecs (AudioEncoder)");
      if (!dec.supported) missing.push("Opus decoding in WebCodecs (AudioDecoder)");
    } catch (err) {
      missing.push(`WebCodecs Opus (${err.message})`);
    }
  }
  return missing;
}

class Device {
  constructor() {
    this.link = null;
    this.ctx = null;
    this.frameIndex = 0;
    this.turnId = 0;
    this.turn = null;                // {id, trigger, frames, closing}
    this.held = null;                // last encoded packet, sent when the next one comes
    this.reply = { active: false, turnId: null, ignoreUpTo: -1 };
    this.playing = false;
    this.awaitingReply = false;
    this.awaitTimer = null;
    this.handsFree = false;
    this.detector = new EnergyDetector();
    this.flushes = [];
    this.flushId = 0;
    this.tapChunks = null;
    this.downResampler = null;
    this.stats = { underruns: 0, concealed: 0, turns: 0, replies: 0 };
  }

  // ------------------------------------------------------------------ audio

  async startAudio() {
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    await this.ctx.audioWorklet.addModule("capture-worklet.js");
    await this.ctx.audioWorklet.addModule("player-worklet.js");
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: {
      echoCancellation: false, noiseSuppression: false, autoGainControl: false,
      channelCount: 1 } });
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "edgevoice-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers" });
    const mute = new GainNode(this.ctx, { gain: 0 }); // keeps the capture node pulled
    source.connect(this.capture).connect(mute).connect(this.ctx.destination);
    this.capture.port.onmessage = (event) => this.onFrame(event.data);

    this.player = new AudioWorkletNode(this.ctx, "edgevoice-player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { prefillMs: 60, maxMs: 30000 } });
    this.tap = new AudioWorkletNode(this.ctx, "edgevoice-tap", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1] });
    this.player.connect(this.tap).connect(this.ctx.destination);
    this.player.port.onmessage = (event) => this.onPlayer(event.data);
    this.tap.port.onmessage = (event) => { if (this.tapChunks) this.tapChunks.push(event.data); };

    this.encoder = new AudioEncoder({
      output: (chunk) => this.onPacket(chunk),
      error: (err) => this.fail(`Opus encoder: ${err.message}`) });
    this.encoder.configure(ENCODER_CONFIG);
    this.decoder = new AudioDecoder({
      output: (data) => this.onDecoded(data),
      error: (err) => this.fail(`Opus decoder: ${err.message}`) });
    this.decoder.configure(DECODER_CONFIG);
    await this.ctx.resume();
  }

  onFrame(samples) {
    const frame = { samples, timestampMs: this.frameIndex * 20 };
    this.frameIndex += 1;
    // hands-free does not listen to the reply (no echo cancellation), nor while the
    // answer to the last turn is still on its way
    const listening = this.handsFree && !this.reply.active && !this.playing &&
      !this.awaitingReply && (!this.turn || this.turn.trigger === "vad");
    if (listening) {
      const result = this.detector.feed(frame);
      this.showLevel(result.level);
      if (result.event === "started") this.startTurn("vad");
      if (this.turn && !this.turn.closing) result.frames.forEach((f) => this.encode(f));
      if (result.event === "ended" && this.turn) this.endTurn("silence");
    } else {
      this.showLevel(null, samples);
      if (this.turn && !this.turn.closing) this.encode(frame);
    }
    if (this.turn && !this.turn.closing && this.turn.frames >= MAX_TURN_FRAMES) {
      this.endTurn("max_length");
    }
  }

  encode(frame) {
    this.turn.frames += 1;
    this.encoder.encode(new AudioData({
      format: "f32", sampleRate: 16000, numberOfFrames: FRAME_SAMPLES, numberOfChannels: 1,
      timestamp: frame.timestampMs * 1000, data: frame.samples }));
  }

  onPacket(chunk) {
    if (!this.turn) return;
    const payload = new Uint8Array(chunk.byteLength);
    chunk.copyTo(payload);
    // one packet is held back, so the last of the turn can carry END
    if (this.held) this.link.sendAudio(this.held.payload, this.held.flags, this.held.timestampMs);
    this.held = { payload, timestampMs: Math.round(chunk.timestamp / 1000),
      flags: this.turn.sentFirst ? Flags.NONE : Flags.START };
    this.turn.sentFirst = true;
  }

  // ------------------------------------------------------------------- turns

  startTurn(trigger) {
    if (this.turn) return;
    if (this.reply.active || this.playing) this.interrupt("barge_in");
    this.turnId += 1;
    this.turn = { id: this.turnId, trigger, frames: 0, closing: false, sentFirst: false };
    this.held = null;
    this.stats.turns += 1;
    this.link.sendControl({ type: "turn_start", turn_id: this.turnId, trigger });
    this.render();
  }

  async endTurn(reason) {
    const turn = this.turn;
    if (!turn || turn.closing) return;
    turn.closing = true;
    if (turn.trigger === "vad") this.detector.reset();
    try { await this.encoder.flush(); } catch (err) { /* reported by the error callback */ }
    if (this.held) {
      this.link.sendAudio(this.held.payload, this.held.flags | Flags.END, this.held.timestampMs);
      this.held = null;
    }
    this.link.sendControl({ type: "turn_end", turn_id: turn.id, reason });
    if (this.turn === turn) this.turn = null;
    this.expectReply(reason !== "answered");
    this.render();
  }

  expectReply(expect) {
    clearTimeout(this.awaitTimer);
    this.awaitingReply = expect;
    if (expect) {
      this.awaitTimer = setTimeout(() => { this.awaitingReply = false; this.render(); },
        AWAIT_REPLY_MS);
    }
  }

  interrupt(reason) {
    const turnId = this.reply.turnId;
    this.flushPlayback(reason);
    this.link.sendControl({ type: "interrupt", turn_id: turnId, reason });
  }

  flushPlayback(reason) {
    // everything received so far belongs to the interrupted reply: drop it, and what
    // is still being decoded, until the relay starts a new reply
    this.reply.active = false;
    this.reply.ignoreUpTo = this.link.lastReceivedSeq ?? -1;
    this.reply.ignoring = true;
    this.flushId += 1;
    const requestedFrame = Math.round(this.ctx.currentTime * this.ctx.sampleRate);
    this.flushes.push({ id: this.flushId, reason, requestedFrame, at: performance.now() });
    this.player.port.postMessage({ type: "flush", id: this.flushId });
    this.render();
  }

  onPlayer(msg) {
    if (msg.type === "state") {
      this.playing = msg.playing;
      this.stats.underruns = msg.underruns;
      if (!msg.playing && !this.reply.active) this.detector.reset();
      this.render();
    } else if (msg.type === "flushed") {
      const flush = this.flushes.find((f) => f.id === msg.id);
      if (flush) {
        flush.flushedFrame = msg.frame;
        flush.latencyMs = ((msg.frame - flush.requestedFrame) / this.ctx.sampleRate) * 1000;
        flush.droppedMs = (msg.dropped / this.ctx.sampleRate) * 1000;
      }
    }
  }

  // ---------------------------------------------------------------- downlink

  onAudio({ frame, missing }) {
    if (this.reply.ignoring) return;
    for (let i = 0; i < Math.min(missing, MAX_CONCEALED_FRAMES); i++) {
      this.stats.concealed += 1;     // WebCodecs has no PLC: 20 ms of silence
      this.push(new Float32Array(Math.round(this.ctx.sampleRate / 50)));
    }
    this.decoder.decode(new EncodedAudioChunk({
      type: "key", timestamp: frame.seq * 20000, data: frame.payload }));
  }

  onDecoded(data) {
    const seq = Math.round(data.timestamp / 20000);
    if (this.reply.ignoring || seq <= this.reply.ignoreUpTo) { data.close(); return; }
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    if (!this.downResampler || this.downResampler.inRate !== data.sampleRate) {
      this.downResampler = new Resampler(data.sampleRate, this.ctx.sampleRate);
    }
    data.close();
    this.push(this.downResampler.process(samples));
  }

  push(samples) {
    if (samples.length) this.player.port.postMessage({ type: "push", samples }, [samples.buffer]);
  }

  onMessage(message) {
    switch (message.type) {
      case "transcript": this.addTranscript(message); break;
      case "response_start":
        this.expectReply(false);
        this.reply = { active: true, turnId: message.turn_id ?? null,
          ignoreUpTo: this.reply.ignoreUpTo,
          ignoring: false };
        this.stats.replies += 1;
        if (this.turn && !this.turn.closing) this.endTurn("answered");
        break;
      case "response_end":
        this.expectReply(false);
        this.reply.active = false;
        this.player.port.postMessage({ type: "end" });
        break;
      case "interrupt": this.flushPlayback("relay"); break;
      case "error": this.expectReply(false); this.status(`relay error ${message.code}: ${message.message}`); break;
      default: break;
    }
    this.render();
  }

  // ---------------------------------------------------------------------- UI

  addTranscript(message) {
    const box = $("transcripts");
    let line = box.lastElementChild;
    const reuse = line && line.classList.contains("partial") && line.dataset.role === message.role;
    if (!reuse) {
      line = document.createElement("div");
      line.dataset.role = message.role;
      box.append(line);
    }
    line.className = `line ${message.role}${message.final === false ? " partial" : ""}`;
    line.replaceChildren();
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = message.role === "user" ? "You" : "Assistant";
    line.append(who, document.createTextNode(message.text));
  }

  showLevel(level, samples) {
    if (level === null) {
      let sum = 0;
      for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
      level = sum > 0 ? 10 * Math.log10(sum / samples.length) : -100;
    }
    if (this.frameIndex % 5 === 0) $("level").value = Math.max(-70, level);
  }

  status(text) { $("status").textContent = text; }

  fail(text) {
    this.status(text);
    if (this.link) this.link.close();
  }

  render() {
    const open = this.link && this.link.state === LinkState.OPEN;
    $("talk").disabled = !open || this.handsFree;
    $("talk").classList.toggle("active", !!this.turn && this.turn.trigger === "button");
    $("interrupt").disabled = !open || !(this.reply.active || this.playing);
    $("handsfree").disabled = !open;
    let doing = "ready";
    if (this.turn) doing = `listening (turn ${this.turn.id}, ${this.turn.trigger})`;
    else if (this.playing) doing = "speaking";
    else if (this.reply.active || this.awaitingReply) doing = "waiting for the reply";
    else if (this.handsFree) doing = "hands-free: waiting for speech";
    const s = this.link ? this.link.stats : null;
    $("stats").textContent = s ? `${doing} · sent ${s.framesSent} frames · received ` +
      `${s.framesReceived} · underruns ${this.stats.underruns} · resumes ${s.resumes}` : "";
  }

  // ------------------------------------------------------------------- link

  async connect(ticketText) {
    const parsed = parseTicket(ticketText);
    if (!parsed) { this.status("That is not a ticket (it looks like name.secret)."); return; }
    if (!this.ctx) {
      try { await this.startAudio(); } catch (err) {
        this.status(`Cannot use the microphone or audio: ${err.message}`);
        this.ctx = null;
        return;
      }
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.link = new Link({ url: `${scheme}//${location.host}/`, device: parsed.device,
      ticket: parsed.ticket, software: SOFTWARE });
    this.link.addEventListener("state", (e) => this.onLinkState(e.detail));
    this.link.addEventListener("message", (e) => this.onMessage(e.detail));
    this.link.addEventListener("audio", (e) => this.onAudio(e.detail));
    this.link.addEventListener("rtt", (e) => {
      $("rtt").textContent = `RTT ${e.detail.rttMs.toFixed(1)} ms`;
    });
    this.link.addEventListener("session", (e) => {
      this.sendStats();  // the relay's fleet view (and the device's time zone) at once
      this.status(e.detail.resumed ? `Resumed session ${e.detail.id.slice(0, 8)}.`
        : `Connected as ${parsed.device} (session ${e.detail.id.slice(0, 8)}).`);
      if (!e.detail.resumed && this.turn) { this.turn = null; this.held = null; }
    });
    $("connect").disabled = true;
    $("ticket").value = "";
    this.startedAt = performance.now();
    clearInterval(this.statsTimer);
    this.statsTimer = setInterval(() => this.sendStats(), STATS_INTERVAL_MS);
    this.link.connect();
  }

  /** The compact stats a daemon sends too (same keys where they apply). */
  sendStats() {
    if (!this.link || this.link.state !== LinkState.OPEN) return;
    const link = this.link;
    this.link.sendControl({ type: "stats", values: {
      version: SOFTWARE,
      browser: navigator.userAgent.slice(0, 120),
      timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC",
      uptime_s: Math.round((performance.now() - this.startedAt) / 100) / 10,
      state: this.turn ? "listening" : this.playing ? "speaking" : "idle",
      rtt_ms: link.rttMs === null ? null : Math.round(link.rttMs * 10) / 10,
      reconnects: link.stats.reconnects,
      resumes: link.stats.resumes,
      frames_sent: link.stats.framesSent,
      frames_received: link.stats.framesReceived,
      underruns: this.stats.underruns,
      turns: this.stats.turns,
      hands_free: this.handsFree,
    } });
  }

  onLinkState({ state, reason }) {
    const badge = $("state");
    badge.textContent = state;
    badge.dataset.state = state;
    if (state === LinkState.CLOSED) {
      this.status(`Disconnected: ${reason}`);
      $("connect").disabled = false;
      clearInterval(this.statsTimer);
      this.turn = null;
    } else if (state === LinkState.RECONNECTING) {
      this.status(`Reconnecting: ${reason}`);
    }
    this.render();
  }

  // -------------------------------------------------------------- test hooks

  startTap() { this.tapChunks = []; this.tap.port.postMessage({ type: "start" }); }

  /** What went through the output graph since startTap(), as 16-bit PCM in base64. */
  stopTap() {
    this.tap.port.postMessage({ type: "stop" });
    const chunks = this.tapChunks || [];
    this.tapChunks = null;
    const total = chunks.reduce((n, c) => n + c.samples.length, 0);
    const pcm = new Int16Array(total);
    let i = 0;
    for (const c of chunks) {
      for (const v of c.samples) pcm[i++] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
    }
    let binary = "";
    const bytes = new Uint8Array(pcm.buffer);
    for (let j = 0; j < bytes.length; j += 0x8000) {
      binary += String.fromCharCode.apply(null, bytes.subarray(j, j + 0x8000));
    }
    return { rate: this.ctx.sampleRate, startFrame: chunks.length ? chunks[0].frame : 0,
      pcm: btoa(binary) };
  }
}

async function main() {
  const device = new Device();
  window.edgevoice = device;       // for the curious, and for the tests
  const missing = await missingFeatures();
  if (missing.length) {
    const box = $("support");
    box.hidden = false;
    box.textContent = `This browser cannot be an edgevoice device: it lacks ${missing.join(", ")}. ` +
      "Current Chromium, Chrome, Edge and desktop Firefox have everything.";
    $("connect").disabled = true;
    document.body.dataset.ready = "unsupported";
    return;
  }
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("ticket")) {
    $("ticket").value = fragment.get("ticket");
    history.replaceState(null, "", location.pathname);   // keep it out of the history
  }
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    device.connect($("ticket").value);
  });
  const talk = $("talk");
  const press = (event) => { event.preventDefault(); device.startTurn("button"); };
  const release = () => { if (device.turn && device.turn.trigger === "button") device.endTurn("release"); };
  talk.addEventListener("pointerdown", press);
  talk.addEventListener("pointerup", release);
  talk.addEventListener("pointerleave", release);
  // the space bar is a talk button too (outside the ticket field)
  const typing = (event) => event.target instanceof HTMLInputElement && event.target.type !== "checkbox";
  document.addEventListener("keydown", (event) => {
    if (event.code !== "Space" || event.repeat || typing(event) || talk.disabled) return;
    press(event);
  });
  document.addEventListener("keyup", (event) => {
    if (event.code === "Space" && !typing(event)) release();
  });
  $("interrupt").addEventListener("click", () => device.interrupt("button"));
  $("handsfree").addEventListener("change", (event) => {
    device.handsFree = event.target.checked;
    if (!device.handsFree && device.turn && device.turn.trigger === "vad") device.endTurn("toggle");
    device.detector.reset();
    device.render();
  });
  document.body.dataset.ready = "yes";
}

main();
