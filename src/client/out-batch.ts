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

  /** Forwards bytes [start, end) of `buf`; contiguous ranges of the same buffer merge. */
  range(buf: Buffer, start: number, end: number): void {
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

  /** Writes everything collected; returns false when the socket asks us to wait for 'drain'. */
  flush(socket: Socket): boolean {
    this.closeRun();
    const parts = this.parts;
    if (parts.length === 0) return true;
    this.parts = [];
    if (parts.length === 1) return socket.write(parts[0]);
    socket.cork();
    let ok = true;
    for (const p of parts) ok = socket.write(p);
    socket.uncork();
    return ok;
  }
}
