/**
 * Log ids of one trustgate instance: `(instance, log_id)` is unique in both logs, and the writer
 * inserts with `ON CONFLICT DO NOTHING` (unique (instance, log_id)), so a replayed batch is written exactly
 * once. An id must therefore never be reused by the same instance, also after a restart.
 *
 * id = max(previous id + 1, wall clock in microseconds since 1970). The microsecond clock moves on
 * during any restart, so a restarted instance starts above everything it issued before; more than
 * one id per microsecond borrows from the future, which the next process also starts above as long
 * as it starts later than the borrowed time (a million records per second would borrow about as
 * much time as they take). On its first connection the writer also raises the counter above the
 * highest id of this instance already in the database (`trustgate.audit_high_water`), and replays
 * raise it above spooled ids, so only a wall clock stepped back across a restart, while the
 * database was unreachable, could repeat an id. Ids stay below 2^53 (exact in JavaScript and JSON)
 * until the year 2255.
 */
export class LogIdGenerator {
  private last = 0;

  constructor(private readonly clock: () => number = Date.now) {}

  next(): number {
    const t = Math.floor(this.clock()) * 1000;
    this.last = t > this.last ? t : this.last + 1;
    return this.last;
  }

  /** Ensures the next id is above `id` (a high-water mark seen in the database or the spool). */
  atLeast(id: number): void {
    if (Number.isSafeInteger(id) && id > this.last) this.last = id;
  }

  get lastId(): number {
    return this.last;
  }
}
