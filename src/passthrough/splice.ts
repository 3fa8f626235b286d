/**
 * Joins two sockets so that bytes move both ways without being looked at: stream piping, with
 * the sockets' own backpressure (a full destination pauses its source). Used by TLS passthrough
 * and by relayed sessions after authentication.
 */
import type { Socket } from 'node:net';

/** Grace for the other side to flush what it still holds after one side closed. */
const CLOSE_GRACE_MS = 1000;

/**
 * Pipes `a` ↔ `b`. When one side closes, the other is ended (its pending bytes still leave) and
 * destroyed after a grace; on an error both are destroyed at once. `onClosed` runs once.
 */
export function splice(a: Socket, b: Socket, onClosed: () => void): void {
  let done = false;
  const finish = (err?: Error) => {
    if (done) return;
    done = true;
    for (const s of [a, b]) {
      if (err) s.destroy();
      else if (!s.destroyed) {
        s.end();
        setTimeout(() => s.destroy(), CLOSE_GRACE_MS).unref();
      }
    }
    onClosed();
  };
  for (const s of [a, b]) {
    s.on('error', finish);
    s.once('close', () => finish());
  }
  // A side that is already gone will never emit 'close' again: end the other one now.
  if (a.destroyed || b.destroyed) {
    finish();
    return;
  }
  a.pipe(b);
  b.pipe(a);
}
