// Hands-free speech detector: energy (RMS dBFS) per 20 ms frame against an
// adaptive noise floor, with hysteresis, a hangover and a pre-roll. Pure: it is fed
// frames and returns what happened; it never touches audio or time itself.
// States: QUIET -> SPEAKING (onset) -> QUIET (release held for the hangover).

export const DetectorState = Object.freeze({ QUIET: "quiet", SPEAKING: "speaking" });
const TRANSITIONS = new Set(["quiet>speaking", "speaking>quiet"]);

export const DEFAULT_DETECTOR = Object.freeze({
  onsetAboveFloorDb: 12,   // start when this far above the noise floor ...
  releaseAboveFloorDb: 6,  // ... and count as silence below this
  minLevelDbfs: -50,       // never call anything quieter than this speech
  onsetFrames: 3,          // loud frames in a row before speech starts (60 ms)
  hangoverFrames: 40,      // quiet frames in a row before speech ends (800 ms)
  prerollFrames: 15,       // frames kept from before the onset (300 ms)
  floorRise: 0.005,        // how fast the floor follows louder noise, per frame
  floorFall: 0.1,          // how fast it follows quieter noise, per frame
});

export function levelDbfs(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  return rms > 0 ? Math.max(-100, 20 * Math.log10(rms)) : -100;
}

export class EnergyDetector {
  constructor(settings = DEFAULT_DETECTOR) {
    this.s = { ...DEFAULT_DETECTOR, ...settings };
    this.state = DetectorState.QUIET;
    this.floorDb = -60;
    this.loud = 0;
    this.quiet = 0;
    this.preroll = [];
  }

  transition(to) {
    if (!TRANSITIONS.has(`${this.state}>${to}`)) {
      throw new Error(`detector: illegal transition ${this.state} -> ${to}`);
    }
    this.state = to;
  }

  /** Feed one frame ({samples, ...}); returns {event: null|"started"|"ended",
   *  frames: [...the frames to send now, pre-roll included], level}. */
  feed(frame) {
    const level = levelDbfs(frame.samples);
    const s = this.s;
    if (this.state === DetectorState.QUIET) {
      const onset = level > Math.max(s.minLevelDbfs, this.floorDb + s.onsetAboveFloorDb);
      this.loud = onset ? this.loud + 1 : 0;
      if (!onset) {
        const rate = level > this.floorDb ? s.floorRise : s.floorFall;
        this.floorDb += (level - this.floorDb) * rate;
      }
      this.preroll.push(frame);
      if (this.preroll.length > s.prerollFrames) this.preroll.shift();
      if (this.loud >= s.onsetFrames) {
        this.transition(DetectorState.SPEAKING);
        this.quiet = 0;
        const frames = this.preroll;
        this.preroll = [];
        return { event: "started", frames, level };
      }
      return { event: null, frames: [], level };
    }
    const silent = level < Math.max(s.minLevelDbfs, this.floorDb + s.releaseAboveFloorDb);
    this.quiet = silent ? this.quiet + 1 : 0;
    if (this.quiet >= s.hangoverFrames) {
      this.transition(DetectorState.QUIET);
      this.loud = 0;
      return { event: "ended", frames: [frame], level };
    }
    return { event: null, frames: [frame], level };
  }

  reset() {
    this.state = DetectorState.QUIET;
    this.loud = 0;
    this.quiet = 0;
    this.preroll = [];
  }
}
