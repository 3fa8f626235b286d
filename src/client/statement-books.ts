/**
 * Transaction mode: the gateway's books on protocol-level named prepared statements. A client's
 * statement is known under a server name derived from its SQL text, and prepared on demand on
 * whichever server connection the client gets; each server connection keeps its own set of
 * prepared server names (`ServerConnection.prepared`, least recently used first).
 */
import { createHash } from 'node:crypto';
import type { ServerConnection } from '../server/server-connection.js';

/** Server names prepared on one server connection, least recently used first. */
type ServerStatements = ServerConnection['prepared'];

export interface ClientStatement {
  serverName: string;
  /** The Parse message under the server name, to prepare it on any server that lacks it. */
  parse: Buffer;
}

/**
 * What to undo when PostgreSQL skips a request after an error in the same batch (up to Sync):
 * the gateway's books on which statements exist must follow what really happened.
 */
export interface StatementUndo {
  /** parse: a Parse sent to the server; virtual-parse: a Parse the gateway answered itself;
   *  evict: a Close of a least-recently-used statement; close: a client Close answered by the gateway. */
  kind: 'parse' | 'virtual-parse' | 'evict' | 'close';
  serverName: string;
  clientName: string | null;
  statement: ClientStatement | null;
}

/** The client's named statements, by the names the client gave them. */
export class StatementBooks {
  private readonly byClientName = new Map<string, ClientStatement>();

  get(clientName: string): ClientStatement | undefined {
    return this.byClientName.get(clientName);
  }

  has(clientName: string): boolean {
    return this.byClientName.has(clientName);
  }

  define(clientName: string, statement: ClientStatement): void {
    this.byClientName.set(clientName, statement);
  }

  /** Forgets a client name; returns the statement it named, if any. */
  forget(clientName: string): ClientStatement | null {
    const statement = this.byClientName.get(clientName) ?? null;
    this.byClientName.delete(clientName);
    return statement;
  }

  /** PostgreSQL failed or skipped the request `undo` belongs to: correct these books and `prepared`'s. */
  undo(undo: StatementUndo, prepared: ServerStatements): void {
    switch (undo.kind) {
      case 'parse':
        prepared.delete(undo.serverName);
        this.forgetIfStill(undo);
        return;
      case 'virtual-parse':
        this.forgetIfStill(undo);
        return;
      case 'evict':
        prepared.set(undo.serverName, true);
        return;
      case 'close':
        if (undo.clientName !== null && !this.byClientName.has(undo.clientName)) this.byClientName.set(undo.clientName, undo.statement!);
        return;
    }
  }

  /** Drops the client name the undone Parse defined, unless it names another statement by now. */
  private forgetIfStill(undo: StatementUndo): void {
    if (undo.clientName !== null && this.byClientName.get(undo.clientName) === undo.statement) this.byClientName.delete(undo.clientName);
  }
}

/**
 * Server-side name of a client statement: same SQL and parameter types → same name. Hashes the
 * raw bytes (query, NUL, types): decoded text would map different non-UTF-8 queries (e.g. from a
 * LATIN1 client) to the same name.
 */
export function statementServerName(buf: Buffer, queryStart: number, end: number): string {
  const h = createHash('sha1').update(buf.subarray(queryStart, end)).digest('hex');
  return `tg_${h.slice(0, 28)}`;
}

/** Is `serverName` prepared on this server connection? If so it becomes the most recently used. */
export function usePrepared(prepared: ServerStatements, serverName: string): boolean {
  if (!prepared.has(serverName)) return false;
  prepared.delete(serverName);
  prepared.set(serverName, true);
  return true;
}

/**
 * Takes the least recently used statement off the books of a server connection holding more
 * than `max` (0: no limit); the caller closes it on the server. Null when within the limit.
 */
export function evictOldest(prepared: ServerStatements, max: number): string | null {
  if (prepared.size <= max || max <= 0) return null;
  const oldest = prepared.keys().next().value as string;
  prepared.delete(oldest);
  return oldest;
}
