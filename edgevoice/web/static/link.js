// The page's link to the relay: wire protocol v1 over one WebSocket at a time,
// authenticated by a ticket, with heartbeats (RTT) and session resume (§7).
// It owns the session's counters, journal and queue; app.js owns the audio.
//
// States:  idle -> connecting -> open -> reconnecting -> connecting ... -> closed
import {
  Flags, Kind, RELIABLE_FROM_DEVICE, RELIABLE_FROM_RELAY, SUBPROTOCOL, TICKET_PREFIX,
  ProtocolError, decodeAudio, decodeMessage, encodeAudio, encodeMessage, hello,
} from "./protocol.js";

export const LinkState = Object.freeze({
  IDLE: "idle", CONNECTING: "connecting", OPEN: "open",
  RECONNECTING: "reconnecting", CLOSED: "closed",
});
const TRANSITIONS = new Set([
  "idle>connecting", "connecting>open", "connecting>reconnecting", "connecting>closed",
  "open>reconnecting", "open>closed", "reconnecting>connecting", "reconnecting>closed",
  "closed>connecting",
]);

// Relay closes after which the page stops instead of coming back (§5).
const STOP_CLOSES = new Map([
  [4000, "this device connected again elsewhere"],
  [4002, "this relay speaks another protocol version: reload the page"],
  [1008, "the relay closed the link (policy: rate limit or device mismatch)"],
]);
// Relay closes that end the session: come back with a new one (§7.2).
const NEW_SESSION_CLOSES = new Set([1000, 1001, 1002, 1009, 1011]);

const JOURNAL_FRAMES = 500;      // 10 s of audio
const JOURNAL_MESSAGES = 256;
const QUEUE_FRAMES = 500;
const RESUME_WINDOW_MS = 10000;
const RETRY_MAX_MS = 1000;       // retry at least this often within the resume window
const MAX_RETRIES = 15;           // failed reconnects in a row before giving up

export class Link extends EventTarget {
  constructor({ url, device, ticket, software }) {
    super();
    this.url = url;
    this.device = device;
    this.ticket = ticket;            // single use: cleared once presented
    this.software = software;
    this.state = LinkState.IDLE;
    this.ws = null;
    this.session = null;             // {id, resumable}
    this.heartbeatMs = 10000;
    this.rttMs = null;
    this.stats = { framesSent: 0, framesReceived: 0, duplicates: 0, missing: 0,
      resumes: 0, reconnects: 0, queueDropped: 0 };
    this.closeReason = "";
    this.resetSession();
    this.queue = [];
    this.droppedAt = null;
    this.timer = null;
    this.pingTimer = null;
    this.everOpen = false;          // a first connection that fails is a refusal: stop
    this.failedAttempts = 0;
    this.lastTicket = null;
    this.pingId = 0;
  }

  resetSession() {
    this.nextSeq = 0;
    this.lastReceivedSeq = null;
    this.messagesSent = 0;
    this.messagesReceived = 0;
    this.journalFrames = [];
    this.journalMessages = [];
    this.session = null;
  }

  transition(to, reason = "") {
    if (to === this.state) return;
    if (!TRANSITIONS.has(`${this.state}>${to}`)) {
      throw new Error(`link: illegal transition ${this.state} -> ${to}`);
    }
    this.state = to;
    if (reason) this.closeReason = reason;
    this.dispatchEvent(new CustomEvent("state", { detail: { state: to, reason } }));
  }

  // ---------------------------------------------------------------- connecting

  connect() {
    if (!this.ticket) {
      this.transition(LinkState.CLOSED, "no ticket left: get a new one");
      return;
    }
    this.transition(LinkState.CONNECTING);
    const ticket = this.ticket;
    this.ticket = null;
    this.lastTicket = ticket;
    const ws = new WebSocket(this.url, [SUBPROTOCOL, TICKET_PREFIX + ticket]);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    let welcomed = false;
    ws.onopen = () => {
      const resume = this.session && this.resumeWindowOpen()
        ? { session_id: this.session.id, last_downlink_seq: this.lastReceivedSeq,
          downlink_messages: this.messagesReceived }
        : null;
      if (!resume) { this.resetSession(); }
      this.pendingResume = resume;
      ws.send(encodeMessage(hello(this.device, this.software, resume)));
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      try {
        if (!welcomed) {
          if (typeof event.data !== "string") throw new ProtocolError("audio before welcome");
          const message = decodeMessage(event.data);
          if (message.type === "error") { this.emit("message", message); return; }
          if (message.type !== "welcome") throw new ProtocolError(`expected welcome`);
          welcomed = true;
          this.onWelcome(message);
        } else if (typeof event.data === "string") {
          this.onText(event.data);
        } else {
          this.onBinary(event.data);
        }
      } catch (err) {
        if (err instanceof ProtocolError) {
          this.emit("message", { type: "error", code: "protocol_error", message: err.message });
          ws.close(1002, err.message.slice(0, 100));
        } else {
          throw err;
        }
      }
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.stopHeartbeat();
      this.onClosed(event.code, event.reason, welcomed);
    };
  }

  resumeWindowOpen() {
    return this.droppedAt !== null && performance.now() - this.droppedAt < RESUME_WINDOW_MS;
  }

  onWelcome(welcome) {
    if (welcome.ticket) this.ticket = welcome.ticket; // for the next connection
    this.heartbeatMs = welcome.heartbeat_interval_ms || 10000;
    const asked = this.pendingResume;
    const result = welcome.resume || { resumed: false };
    if (result.resumed) {
      if (!asked || welcome.session_id !== asked.session_id) {
        throw new ProtocolError("relay resumed a session the page did not ask for");
      }
      const last = result.last_uplink_seq;
      if ((last !== null && last !== undefined && last >= this.nextSeq) ||
          (result.uplink_messages || 0) > this.messagesSent) {
        throw new ProtocolError("relay claims more than was sent");
      }
    } else if (asked) {
      this.resetSession();           // a new session: the old turn is lost (§7.5)
      this.queue = this.queue.filter((item) => item.kind !== "audio");
    }
    this.session = { id: welcome.session_id };
    this.droppedAt = null;
    this.everOpen = true;
    this.failedAttempts = 0;
    this.transition(LinkState.OPEN);
    if (result.resumed) {
      this.stats.resumes += 1;
      this.replay(result.last_uplink_seq ?? null, result.uplink_messages || 0);
    }
    this.emit("session", { id: welcome.session_id, resumed: !!result.resumed });
    const queued = this.queue;
    this.queue = [];
    for (const item of queued) {
      if (item.kind === "audio") this.sendAudio(item.payload, item.flags, item.timestampMs);
      else this.sendControl(item.message);
    }
    this.startHeartbeat();
  }

  replay(lastUplinkSeq, uplinkMessages) {
    // everything the relay missed, in the order first sent (§7.4)
    const items = [
      ...this.journalFrames.filter((f) => lastUplinkSeq === null || f.seq > lastUplinkSeq)
        .map((f) => ({ order: f.order, send: () => this.ws.send(encodeAudio(
          Kind.UPLINK, f.flags | Flags.REPLAY, f.seq, f.timestampMs, f.payload)) })),
      ...this.journalMessages.filter((m) => m.ordinal > uplinkMessages)
        .map((m) => ({ order: m.order, send: () => this.ws.send(encodeMessage(m.message)) })),
    ].sort((a, b) => a.order - b.order);
    for (const item of items) item.send();
  }

  onClosed(code, reason, welcomed) {
    if (this.state === LinkState.CLOSED) return;
    if (STOP_CLOSES.has(code)) {
      this.transition(LinkState.CLOSED, `${STOP_CLOSES.get(code)} (${code} ${reason})`);
      return;
    }
    if (NEW_SESSION_CLOSES.has(code)) {
      this.resetSession();
      this.droppedAt = null;
    } else if (welcomed && this.session) {
      this.droppedAt = performance.now(); // a drop: try to resume within the window
    }
    if (!welcomed && this.everOpen && this.failedAttempts < MAX_RETRIES) {
      // a reconnect that did not get through (relay unreachable for a moment): the
      // reconnect ticket was probably never presented, so try it again for a while
      this.failedAttempts += 1;
      this.ticket = this.lastTicket;
    }
    if (!this.ticket) {
      const why = welcomed ? "the link dropped and no reconnect ticket is left"
        : "the relay refused the ticket (used, expired, or wrong origin)";
      this.transition(LinkState.CLOSED, `${why}: get a new ticket (${code})`);
      return;
    }
    this.stats.reconnects += 1;
    this.transition(LinkState.RECONNECTING, `link lost (${code}${reason ? " " + reason : ""})`);
    const delay = Math.random() * RETRY_MAX_MS;   // full jitter, within the resume window
    this.timer = setTimeout(() => { this.timer = null; this.connect(); }, delay);
  }

  close() {
    if (this.timer) clearTimeout(this.timer);
    this.stopHeartbeat();
    const ws = this.ws;
    this.ws = null;
    if (this.state !== LinkState.CLOSED && this.state !== LinkState.IDLE) {
      this.transition(LinkState.CLOSED, "closed by the user");
    }
    if (ws) ws.close(1000, "page closed");
  }

  // ----------------------------------------------------------------- heartbeat

  startHeartbeat() {
    this.stopHeartbeat();
    this.ping();
    this.pingTimer = setInterval(() => this.ping(), this.heartbeatMs);
  }

  stopHeartbeat() {
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  ping() {
    if (this.state !== LinkState.OPEN) return;
    this.pingId += 1;
    this.ws.send(encodeMessage({ type: "ping", id: this.pingId,
      sent_ms: Math.round(performance.now()) }));
  }

  // ----------------------------------------------------------------- receiving

  onText(text) {
    const message = decodeMessage(text);
    if (message.type === "welcome") throw new ProtocolError("a second welcome");
    if (RELIABLE_FROM_RELAY.has(message.type)) this.messagesReceived += 1;
    if (message.type === "ping") {
      this.ws.send(encodeMessage({ type: "pong", id: message.id,
        ping_sent_ms: message.sent_ms, sent_ms: Math.round(performance.now()) }));
      return;
    }
    if (message.type === "pong") {
      this.rttMs = performance.now() - message.ping_sent_ms;
      this.emit("rtt", { rttMs: this.rttMs });
      return;
    }
    this.emit("message", message);
  }

  onBinary(data) {
    const frame = decodeAudio(data);
    const last = this.lastReceivedSeq;
    if (last !== null && frame.seq <= last) { this.stats.duplicates += 1; return; }
    const missing = last === null ? 0 : frame.seq - last - 1;
    this.stats.missing += missing;
    this.stats.framesReceived += 1;
    this.lastReceivedSeq = frame.seq;
    this.emit("audio", { frame, missing });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ------------------------------------------------------------------- sending

  sendControl(message) {
    if (this.state !== LinkState.OPEN) {
      if (RELIABLE_FROM_DEVICE.has(message.type)) this.queue.push({ kind: "msg", message });
      return;
    }
    if (RELIABLE_FROM_DEVICE.has(message.type)) {
      this.messagesSent += 1;
      this.journalMessages.push({ ordinal: this.messagesSent, order: this.order(), message });
      if (this.journalMessages.length > JOURNAL_MESSAGES) this.journalMessages.shift();
    }
    this.ws.send(encodeMessage(message));
  }

  sendAudio(payload, flags, timestampMs) {
    if (this.state !== LinkState.OPEN) {
      this.queue.push({ kind: "audio", payload, flags, timestampMs });
      let audio = this.queue.filter((item) => item.kind === "audio").length;
      while (audio > QUEUE_FRAMES) {
        const index = this.queue.findIndex((item) => item.kind === "audio");
        this.queue.splice(index, 1);
        this.stats.queueDropped += 1;
        audio -= 1;
      }
      return;
    }
    const seq = this.nextSeq;
    this.nextSeq += 1;
    this.journalFrames.push({ seq, flags, timestampMs, payload, order: this.order() });
    if (this.journalFrames.length > JOURNAL_FRAMES) this.journalFrames.shift();
    this.stats.framesSent += 1;
    this.ws.send(encodeAudio(Kind.UPLINK, flags, seq, timestampMs, payload));
  }

  order() {
    this.sent = (this.sent || 0) + 1;
    return this.sent;
  }
}
