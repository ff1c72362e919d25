// Wire protocol v1 (docs/protocol.md): control messages and binary audio frames.
// Pure functions, no I/O: link.js moves what they build over the WebSocket.

export const SUBPROTOCOL = "edgevoice.v1";
export const TICKET_PREFIX = "edgevoice.ticket.";
export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 12;
export const MAX_OPUS_BYTES = 1275;
export const MAX_TEXT_BYTES = 16 * 1024;

export const Kind = Object.freeze({ UPLINK: 1, DOWNLINK: 2 });
export const Flags = Object.freeze({ NONE: 0, START: 1, END: 2, REPLAY: 4 });
const KNOWN_FLAGS = Flags.START | Flags.END | Flags.REPLAY;

export const UPLINK_FORMAT = Object.freeze(
  { codec: "opus", sample_rate_hz: 16000, channels: 1, frame_ms: 20 });
export const DOWNLINK_FORMAT = Object.freeze(
  { codec: "opus", sample_rate_hz: 24000, channels: 1, frame_ms: 20 });

// Reliable messages (counted, journaled, replayed after a resume), per sender (§7.1).
export const RELIABLE_FROM_DEVICE = new Set(["turn_start", "turn_end", "interrupt"]);
export const RELIABLE_FROM_RELAY = new Set(
  ["transcript", "response_start", "response_end", "interrupt", "error"]);
const RELAY_SENDS = new Set([...RELIABLE_FROM_RELAY, "ping", "pong", "welcome"]);

// Close codes after which a session is over: nothing to resume (§7.2).
export const SESSION_ENDING_CLOSES = new Set([1000, 1001, 1002, 1008, 1009, 4000, 4002]);

export class ProtocolError extends Error {}

/** The 12-byte header and one Opus packet, big-endian (§4). */
export function encodeAudio(kind, flags, seq, timestampMs, payload) {
  if (payload.byteLength < 1 || payload.byteLength > MAX_OPUS_BYTES) {
    throw new ProtocolError(`Opus packet of ${payload.byteLength} bytes`);
  }
  const out = new Uint8Array(HEADER_BYTES + payload.byteLength);
  const view = new DataView(out.buffer);
  view.setUint8(0, PROTOCOL_VERSION);
  view.setUint8(1, kind);
  view.setUint8(2, flags);
  view.setUint8(3, 0);
  view.setUint32(4, seq >>> 0);
  view.setUint32(8, timestampMs >>> 0);
  out.set(payload, HEADER_BYTES);
  return out;
}

export function decodeAudio(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.byteLength < HEADER_BYTES + 1 || bytes.byteLength > HEADER_BYTES + MAX_OPUS_BYTES) {
    throw new ProtocolError(`audio frame of ${bytes.byteLength} bytes`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = view.getUint8(0);
  const kind = view.getUint8(1);
  const flags = view.getUint8(2);
  if (version !== PROTOCOL_VERSION) throw new ProtocolError(`audio version ${version}`);
  if (kind !== Kind.DOWNLINK) throw new ProtocolError(`a relay may not send audio kind ${kind}`);
  if (flags & ~KNOWN_FLAGS) throw new ProtocolError(`unknown audio flags ${flags}`);
  return {
    kind, flags, seq: view.getUint32(4), timestampMs: view.getUint32(8),
    payload: bytes.subarray(HEADER_BYTES),
  };
}

export function hello(device, software, resume) {
  return {
    type: "hello", device, protocol: PROTOCOL_VERSION, software,
    uplink: UPLINK_FORMAT, downlink: DOWNLINK_FORMAT, resume: resume ?? null,
  };
}

export function encodeMessage(message) {
  return JSON.stringify(message);
}

function sameFormat(a, b) {
  return a && a.codec === b.codec && a.sample_rate_hz === b.sample_rate_hz &&
    a.channels === b.channels && a.frame_ms === b.frame_ms;
}

/** Parse a relay's control message; throws ProtocolError when it breaks §3. */
export function decodeMessage(text) {
  if (text.length > MAX_TEXT_BYTES) throw new ProtocolError("control message too large");
  let body;
  try { body = JSON.parse(text); } catch (e) { throw new ProtocolError("not JSON"); }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new ProtocolError("not a JSON object");
  }
  if (typeof body.type !== "string") throw new ProtocolError("no string 'type'");
  if (!RELAY_SENDS.has(body.type)) throw new ProtocolError(`unexpected type ${body.type}`);
  const need = (field, type) => {
    if (typeof body[field] !== type) throw new ProtocolError(`${body.type}.${field}: ${type}`);
  };
  switch (body.type) {
    case "welcome":
      need("session_id", "string");
      if ((body.protocol ?? 1) !== PROTOCOL_VERSION) throw new ProtocolError("protocol");
      if (body.uplink && !sameFormat(body.uplink, UPLINK_FORMAT)) throw new ProtocolError("uplink");
      if (body.downlink && !sameFormat(body.downlink, DOWNLINK_FORMAT)) {
        throw new ProtocolError("downlink");
      }
      break;
    case "transcript": need("role", "string"); need("text", "string"); break;
    case "error": need("code", "string"); need("message", "string"); break;
    case "ping": need("id", "number"); need("sent_ms", "number"); break;
    case "pong": need("id", "number"); need("ping_sent_ms", "number"); break;
    default: break;
  }
  return body;
}

/** (device id, ticket) from a ticket `<device-id>.<secret>`, or null. */
export function parseTicket(ticket) {
  const match = /^([a-z0-9][a-z0-9-]{0,62})\.([A-Za-z0-9_-]{32,128})$/.exec(ticket.trim());
  return match ? { device: match[1], ticket: match[0] } : null;
}
