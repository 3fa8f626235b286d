/**
 * Collects what one incoming chunk produces for the other side: runs of forwarded messages are
 * kept as slices of the original chunk (no copy), gateway-made messages are appended, and all of
 * it leaves in one corked write.
 */
import type { Socket } from 'node:net';

export class OutBatch {
  private runBuf: Buffer | null = null;
  private runStart = 0;
  private runEnd = 0;
  private parts: Buffer[] = [];
  /** Sees every message that goes out (the query log); null costs one check per call. */
  observe: ((type: number, buf: Buffer, start: number, end: number) => void) | null = null;
  /** Strict audit: output is held until this settles (a finished request's record is safe). */
  private gate: Promise<void> | null = null;
  private held: Buffer[] = [];

  /** Forwards bytes [start, end) of `buf`; contiguous ranges of the same buffer merge. */
  range(buf: Buffer, start: number, end: number): void {
    if (this.observe) this.observe(buf[start], buf, start, end);
    if (buf === this.runBuf && start === this.runEnd) {
      this.runEnd = end;
      return;
    }
    this.closeRun();
    this.runBuf = buf;
    this.runStart = start;
    this.runEnd = end;
  }

  /** Appends a whole message made by the gateway. */
  message(b: Buffer): void {
    if (this.observe) for (let pos = 0; pos + 5 <= b.length; pos += 1 + b.readInt32BE(pos + 1)) this.observe(b[pos], b, pos, pos + 1 + b.readInt32BE(pos + 1));
    this.closeRun();
    this.parts.push(b);
  }

  private closeRun(): void {
    const b = this.runBuf;
    if (!b) return;
    this.parts.push(this.runStart === 0 && this.runEnd === b.length ? b : b.subarray(this.runStart, this.runEnd));
    this.runBuf = null;
  }

  get empty(): boolean {
    return this.runBuf === null && this.parts.length === 0;
  }

  /** Holds everything collected so far and after, until `p` settles (in order, after earlier holds). */
  holdUntil(p: Promise<unknown>): void {
    const settled = p.then(noop, noop);
    const gate = (this.gate ?? Promise.resolve()).then(() => settled);
    this.gate = gate;
  }

  /** Writes everything collected; returns false when the socket asks us to wait for 'drain'. */
  flush(socket: Socket): boolean {
    this.closeRun();
    if (this.gate) {
      this.held.push(...this.parts);
      this.parts = [];
      const gate = this.gate;
      void gate.then(() => {
        if (this.gate !== gate) return; // a later hold releases everything
        this.gate = null;
        const held = this.held;
        this.held = [];
        if (!socket.destroyed) this.write(socket, held);
      });
      return true;
    }
    const parts = this.parts;
    if (parts.length === 0) return true;
    this.parts = [];
    return this.write(socket, parts);
  }

  private write(socket: Socket, parts: Buffer[]): boolean {
    if (parts.length === 0) return true;
    if (parts.length === 1) return socket.write(parts[0]);
    socket.cork();
    let ok = true;
    for (const p of parts) ok = socket.write(p);
    socket.uncork();
    return ok;
  }
}

function noop(): void {}
