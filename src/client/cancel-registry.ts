/**
 * Gateway-issued cancel keys. Each client gets its own (process id, secret) pair; a CancelRequest
 * is matched here and turned into a cancel of whatever server connection that client is using.
 */
import { randomBytes, randomInt, timingSafeEqual } from 'node:crypto';

export interface Cancellable {
  cancelRunningQuery(): void;
}

export class CancelRegistry {
  private readonly byPid = new Map<number, { key: Buffer; target: Cancellable }>();
  /** Keys issued by servers to relayed sessions (the client holds the server's own key). */
  private readonly external = new Map<number, { key: Buffer; target: Cancellable }[]>();

  /** Issues a fresh key; `keyLength` is 4 for protocol 3.0 and up to 256 for 3.2. */
  register(target: Cancellable, keyLength = 4): { processId: number; secretKey: Buffer } {
    let processId: number;
    do processId = randomInt(1, 0x7fffffff);
    while (this.byPid.has(processId));
    const key = randomBytes(keyLength);
    this.byPid.set(processId, { key, target });
    return { processId, secretKey: key };
  }

  unregister(processId: number): void {
    this.byPid.delete(processId);
  }

  /** Registers a key the gateway did not make (a server's); several servers may use one pid. */
  registerExternal(processId: number, secretKey: Buffer, target: Cancellable): void {
    const list = this.external.get(processId) ?? [];
    list.push({ key: secretKey, target });
    this.external.set(processId, list);
  }

  unregisterExternal(processId: number, target: Cancellable): void {
    const list = this.external.get(processId)?.filter((e) => e.target !== target) ?? [];
    if (list.length > 0) this.external.set(processId, list);
    else this.external.delete(processId);
  }

  /** Returns true when the key matched (the request is then acted on). */
  cancel(processId: number, secretKey: Buffer): boolean {
    const entry = this.byPid.get(processId);
    const hit = entry && keyMatches(entry.key, secretKey) ? entry : this.external.get(processId)?.find((e) => keyMatches(e.key, secretKey));
    if (!hit) return false;
    hit.target.cancelRunningQuery();
    return true;
  }

  get size(): number {
    return this.byPid.size;
  }
}

function keyMatches(key: Buffer, candidate: Buffer): boolean {
  return key.length === candidate.length && timingSafeEqual(key, candidate);
}
