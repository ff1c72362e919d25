// A streaming windowed-sinc resampler for any pair of rates (mono Float32).
// Shared by the capture worklet (device rate -> 16 kHz) and the page's player
// (decoder rate -> output rate). Keeps its own history, so blocks of any size join
// up. The filter is a table of PHASES fractional delays, computed once.

const HALF_TAPS = 16;
const PHASES = 256;

function besselI0(v) {
  let sum = 1, term = 1;
  for (let k = 1; k < 25; k++) { term *= (v / (2 * k)) ** 2; sum += term; }
  return sum;
}

function filterTable(cutoff) {
  const taps = 2 * HALF_TAPS;
  const table = new Float32Array(PHASES * taps);
  const beta = 7;
  for (let p = 0; p < PHASES; p++) {
    const frac = p / PHASES;
    let norm = 0;
    for (let j = 0; j < taps; j++) {
      const x = j - HALF_TAPS + 1 - frac;          // distance from the output instant
      const arg = Math.PI * x * cutoff;
      const sinc = x === 0 ? 1 : Math.sin(arg) / arg;
      const r = x / (HALF_TAPS + 1);
      const w = sinc * besselI0(beta * Math.sqrt(Math.max(0, 1 - r * r))) / besselI0(beta);
      table[p * taps + j] = w;
      norm += w;
    }
    for (let j = 0; j < taps; j++) table[p * taps + j] /= norm; // unity gain at DC
  }
  return table;
}

export class Resampler {
  constructor(inRate, outRate) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.identity = inRate === outRate;
    this.step = inRate / outRate;                  // input samples per output sample
    this.table = this.identity ? null : filterTable(Math.min(1, outRate / inRate) * 0.9);
    this.history = new Float32Array(2 * HALF_TAPS); // zeros: a quiet start
    this.position = HALF_TAPS - 1;                  // next output instant in history+input
  }

  /** Resample one block; returns the output samples it completes. */
  process(input) {
    if (this.identity) return Float32Array.from(input);
    const taps = 2 * HALF_TAPS;
    const buffer = new Float32Array(this.history.length + input.length);
    buffer.set(this.history, 0);
    buffer.set(input, this.history.length);
    const limit = buffer.length - HALF_TAPS;
    const out = new Float32Array(Math.max(0, Math.ceil((limit - this.position) / this.step)));
    let n = 0;
    let t = this.position;
    while (t < limit && n < out.length) {
      const center = Math.floor(t);
      const phase = Math.min(PHASES - 1, Math.round((t - center) * PHASES));
      const base = phase * taps;
      const start = center - HALF_TAPS + 1;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buffer[start + j] * this.table[base + j];
      out[n++] = acc;
      t += this.step;
    }
    const keep = this.history.length;
    this.history = buffer.slice(buffer.length - keep);
    this.position = t - (buffer.length - keep);
    return n === out.length ? out : out.subarray(0, n);
  }
}
