/**
 * Transaction mode: the requests sent to the server (or answered by the gateway) whose replies
 * the client still awaits, in order. The server's replies are matched against the head; replies
 * the gateway makes itself wait in the queue so that the client sees every reply in request order.
 *
 * Kept as parallel arrays indexed by head and tail and reused once drained, so the relay
 * allocates nothing per request.
 */
import { Backend } from '../protocol/constants.js';
import type { StatementUndo } from './statement-books.js';

/** What a request sent to the server is answered with (see `completes`). */
export const enum Expect {
  Query = 1, // simple Query or FunctionCall: everything up to ReadyForQuery
  Sync,
  Parse,
  Bind,
  Describe,
  Execute,
  Close,
  /** No server reply: the gateway answers with `payload` when this reaches the head. */
  Synthetic,
}

/** What becomes of the replies to a request: passed on to the client, or dropped (the gateway's own). */
export const enum ReplyAction {
  Forward = 0,
  Swallow = 1,
  /** Forwarded, but the CommandComplete is replaced by the entry's payload (gateway statements run as a CALL). */
  RenameTag = 2,
  /**
   * A request led by SET QUERY_BAND that the gateway sent with its switch statement in front: the
   * switch's rows are dropped, its CommandComplete becomes the payload, error positions are moved
   * back to the client's text.
   */
  BandLed = 3,
}

export class ReplyQueue {
  private readonly kinds: Expect[] = [];
  private readonly actions: ReplyAction[] = [];
  private readonly payloads: (Buffer | null)[] = [];
  private readonly undos: (StatementUndo | null)[] = [];
  /** [head, tail) are the requests awaiting replies; tail is the next free slot. */
  private head = 0;
  private tail = 0;

  get empty(): boolean {
    return this.head === this.tail;
  }

  get headKind(): Expect {
    return this.kinds[this.head];
  }

  get headAction(): ReplyAction {
    return this.actions[this.head];
  }

  /** The gateway's reply of a Synthetic entry at the head. */
  get headPayload(): Buffer | null {
    return this.payloads[this.head];
  }

  /** How to correct the statement books if the server fails or skips the head request. */
  get headUndo(): StatementUndo | null {
    return this.undos[this.head];
  }

  push(kind: Expect, action: ReplyAction, payload: Buffer | null, undo: StatementUndo | null): void {
    const i = this.tail++;
    this.kinds[i] = kind;
    this.actions[i] = action;
    this.payloads[i] = payload;
    this.undos[i] = undo;
  }

  setHeadAction(action: ReplyAction): void {
    this.actions[this.head] = action;
  }

  /** The head request is answered: the next one becomes the head. */
  advance(): void {
    this.head++;
  }

  /**
   * ReadyForQuery: drops entries up to and including the first Query or Sync (the request it
   * answers) and returns that request's action; Forward if there is none.
   */
  advancePastSync(): ReplyAction {
    while (this.head < this.tail) {
      const kind = this.kinds[this.head];
      const action = this.actions[this.head];
      this.head++;
      if (kind === Expect.Query || kind === Expect.Sync) return action;
    }
    return ReplyAction.Forward;
  }

  /** Once drained, starts over at index 0, keeping the arrays (no reallocation per request). */
  resetIfDrained(): void {
    if (this.head === this.tail && this.head > 0) {
      this.head = 0;
      this.tail = 0;
    }
  }
}

/** Does a server message of `type` complete a request of `kind`? */
export function completes(type: number, kind: Expect): boolean {
  switch (kind) {
    case Expect.Parse:
      return type === Backend.ParseComplete;
    case Expect.Bind:
      return type === Backend.BindComplete;
    case Expect.Close:
      return type === Backend.CloseComplete;
    case Expect.Describe:
      return type === Backend.RowDescription || type === Backend.NoData;
    case Expect.Execute:
      return type === Backend.CommandComplete || type === Backend.EmptyQueryResponse || type === Backend.PortalSuspended;
    default:
      return false;
  }
}
