/**
 * The audit writer: takes records off the request path and puts them in the database in batches,
 * or in the local spool while the database cannot take them, and replays the spool later.
 *
 * - `enqueue()` is synchronous and O(1): a push onto an in-memory queue. Nothing else happens on
 *   the request path (formatting, JSON, I/O all happen in the batch).
 * - A batch (up to `batchSize` records; sent every `flushIntervalMs`, at once when `batchSize` are
 *   queued or a synchronous caller waits) is ONE statement: an INSERT … SELECT FROM unnest(column
 *   arrays) (live batches) or json_populate_recordset(JSON lines) (spool replay) ON CONFLICT DO
 *   NOTHING (unique (instance, log_id)) into each log, so sending the same batch again (a replay,
 *   a retry after a timeout) writes every record exactly once. JSON lines are made only when a
 *   sink needs them (the spool, JSON lines, the rejected file).
 * - The database connection is the writer's own, as the auth role; it reconnects with backoff.
 * - If the database is down, a write fails, or it takes longer than `spoolAfterMs`, the batch is
 *   appended to the spool (fsync'd). While the spool holds records, new batches go to the spool
 *   too, so it is replayed in order; replay runs whenever the database is reachable.
 * - Bounded memory: at `maxQueueRecords` queued (database and spool both failing), `refuse` makes
 *   `accepting` false (the session refuses new requests; a little headroom takes the records of
 *   requests already running), `drop` drops new records, counted, with a loud error.
 *
 * Crash bound: a record is safe once committed or fsync'd to the spool; a crash loses at most the
 * records still queued in memory — those of the last flush interval (at most `batchSize`, or the
 * backlog while the database is slow and the spool unwritable). Synchronous callers
 * (`waiter`) are told only once their record is safe.
 */
import { EventEmitter } from 'node:events';
import path from 'node:path';
import fsp from 'node:fs/promises';
import { ServerConnection, type ServerEndpoint } from '../server/server-connection.js';
import type { Logger } from '../log/logger.js';
import type { ControlCredentials } from '../trust/rules-store.js';
import { ACCESS_LOG_COLUMNS, QUERY_LOG_COLUMNS, type AuditEntry, type EntryFormatter, type LogKind } from './records.js';
import type { LogIdGenerator } from './log-id.js';
import { Spool, type SpoolRecord } from './spool.js';
import { HIGH_WATER_SQL, INSERT_BATCH_SQL, INSERT_COLUMNS_SQL } from './audit-sql.js';

export type OverflowPolicy = 'refuse' | 'drop';

export interface AuditWriterOptions {
  instance: string;
  endpoint: ServerEndpoint;
  database: string;
  credentials: ControlCredentials;
  /** Directory of the spool; null = no spool (records wait in memory only). */
  spoolDir: string | null;
  formatter: EntryFormatter;
  ids: LogIdGenerator;
  flushIntervalMs: number;
  batchSize: number;
  spoolAfterMs: number;
  maxQueueRecords: number;
  onOverflow: OverflowPolicy;
  log: Logger;
}

export interface AuditWriterStats {
  /** Records in memory now. */
  queued: number;
  /** Records inserted into the database by live batches. */
  written: number;
  /** Records appended to the spool. */
  spooled: number;
  /** Records sent from the spool to the database. */
  replayed: number;
  /** Records sent again that the database already had (ON CONFLICT): retries, replays after a crash. */
  duplicates: number;
  /** Records lost to the overflow policy or a close with nowhere to put them. */
  dropped: number;
  /** Records the database refused as invalid (kept in <spool>/<instance>.rejected.jsonl). */
  rejected: number;
  /** Failed database writes and spool appends. */
  failures: number;
  spoolBytes: number;
  spoolFiles: number;
  database: 'up' | 'down';
  accepting: boolean;
  lastError: string | null;
}

/** Backoff of reconnects and retries while the database fails. */
const RETRY_MS = [200, 1_000, 2_000, 5_000];
/** A replay is not on anyone's wait path: it may take longer than spoolAfterMs. */
const REPLAY_TIMEOUT_MS = 60_000;
/** After a failed spool append, try the spool again after this long. */
const SPOOL_RETRY_MS = 1_000;
/** Drop and failure errors are logged at most this often (with counts), never silently skipped. */
const LOUD_EVERY_MS = 5_000;

/**
 * Errors that retrying the same rows can never fix (the rows are invalid). Not 23514: it is also
 * "no partition of relation found for row" (a partitioned log missing this month's partition),
 * which an administrator fixes — until then the rows wait in the spool.
 */
const isDataError = (code: string): boolean => (code.startsWith('22') || code.startsWith('23') || code === '42804') && code !== '23514';

/**
 * A record of a batch: a live one (its entry; the JSON line is made only if a sink needs it: the
 * spool, the rejected file) or one read back from the spool (its line).
 */
interface Item {
  log: LogKind;
  entry?: AuditEntry;
  line?: string;
}

const NEEDS_ESCAPE = /["\\]/;
const ESCAPE = /["\\]/g;

/** One element of a PostgreSQL array literal (text form) for a row value. */
function arrayElement(v: unknown): string {
  if (v === null || v === undefined) return 'NULL';
  switch (typeof v) {
    case 'number':
      return Number.isFinite(v) ? String(v) : 'NULL';
    case 'boolean':
      return v ? 't' : 'f';
    case 'string':
      return NEEDS_ESCAPE.test(v) ? `"${v.replace(ESCAPE, '\\$&')}"` : `"${v}"`;
    default: {
      // jsonb values (rule, params)
      const j = JSON.stringify(v);
      return NEEDS_ESCAPE.test(j) ? `"${j.replace(ESCAPE, '\\$&')}"` : `"${j}"`;
    }
  }
}

const QUERY_COLUMN_NAMES = QUERY_LOG_COLUMNS.map((c) => c[1]);
const ACCESS_COLUMN_NAMES = ACCESS_LOG_COLUMNS.map((c) => c[1]);

/** The parameters of INSERT_COLUMNS_SQL: one array literal per column of each log. */
function columnArrays(rows: Record<string, unknown>[], names: readonly string[], out: string[]): void {
  for (const name of names) {
    let s = '{';
    for (let i = 0; i < rows.length; i++) s += (i === 0 ? '' : ',') + arrayElement(rows[i][name]);
    out.push(s + '}');
  }
}

export class AuditWriter extends EventEmitter {
  private q: AuditEntry[] = [];
  private qHead = 0;
  /** Waiting synchronous callers among the queued records. */
  private waiting = 0;
  private readonly hardLimit: number;
  private accepting_ = true;
  private readonly spool: Spool | null;
  private conn: ServerConnection | null = null;
  private connecting = false;
  private connectTimer: NodeJS.Timeout | null = null;
  /** Consecutive database failures (connects and writes); reset by a successful write. */
  private failStreak = 0;
  /** Rows the last insert() really stored (the rest existed already). */
  private lastInserted = 0;
  private flushTimer: NodeJS.Timeout | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private flushDue = false;
  private kickPending = false;
  private pumping: Promise<void> | null = null;
  private pumpAgain = false;
  /** No live batch is attempted before this time (database down and spool failing). */
  private stuckUntil = 0;
  private spoolRetryAt = 0;
  private replayRetryAt = 0;
  private replayFile: string | null = null;
  private replayIter: AsyncGenerator<SpoolRecord[]> | null = null;
  private closed = false;
  private closing: Promise<void> | null = null;
  /**
   * Until the first connection attempt settles (at most spoolAfterMs), live batches wait in
   * memory rather than going to the spool only because the writer has just started.
   */
  private initialConnect = true;
  private initialConnectDone: () => void = () => undefined;
  private readonly initialConnectSettled = new Promise<void>((resolve) => (this.initialConnectDone = resolve));
  private readonly lastLoud = new Map<string, { at: number; suppressed: number }>();
  readonly stats: Omit<AuditWriterStats, 'queued' | 'spoolBytes' | 'spoolFiles' | 'database' | 'accepting'> = {
    written: 0,
    spooled: 0,
    replayed: 0,
    duplicates: 0,
    dropped: 0,
    rejected: 0,
    failures: 0,
    lastError: null,
  };

  constructor(private readonly o: AuditWriterOptions) {
    super();
    // Room for the records of requests already running when `accepting` turned false.
    this.hardLimit = o.maxQueueRecords + Math.max(1_000, Math.ceil(o.maxQueueRecords / 10));
    this.spool = o.spoolDir ? new Spool(o.spoolDir, o.instance, o.log) : null;
  }

  /** Opens the spool (an earlier run's records are replayed once connected) and connects. */
  start(): void {
    if (this.spool) {
      this.spool.open().then(
        () => this.kick(),
        (err: Error) => this.loud('spool', `audit spool directory ${this.o.spoolDir} is not usable: ${err.message}`),
      );
    }
    this.connect();
    setTimeout(() => this.endInitialConnect(), this.o.spoolAfterMs).unref();
  }

  private endInitialConnect(): void {
    if (!this.initialConnect) return;
    this.initialConnect = false;
    this.initialConnectDone();
    this.kick();
  }

  /** False while the queue is full under `on_overflow: refuse`: new requests should be refused. */
  get accepting(): boolean {
    return this.accepting_;
  }

  get queued(): number {
    return this.q.length - this.qHead;
  }

  snapshot(): AuditWriterStats {
    return {
      queued: this.queued,
      ...this.stats,
      spoolBytes: this.spool?.stats.bytes ?? 0,
      spoolFiles: this.spool?.stats.files ?? 0,
      database: this.conn && !this.conn.closed ? 'up' : 'down',
      accepting: this.accepting_,
    };
  }

  /** Queues a record (synchronous, O(1)). False when it was dropped (overflow or closed). */
  enqueue(e: AuditEntry): boolean {
    if (this.closed) {
      this.drop([e], 'the audit writer is closed');
      return false;
    }
    const n = this.queued;
    if (n >= this.o.maxQueueRecords && (this.o.onOverflow === 'drop' || n >= this.hardLimit)) {
      this.drop([e], `the audit queue is full (${n} records: the database and the spool cannot take them)`);
      return false;
    }
    this.q.push(e);
    if (e.waiter) this.waiting++;
    if (n + 1 >= this.o.maxQueueRecords && this.o.onOverflow === 'refuse') this.setAccepting(false);
    if (n + 1 >= this.o.batchSize || e.waiter) this.kick();
    else this.armFlushTimer();
    return true;
  }

  /** Records left in the queue are sent within flush_interval_ms, also when no new record comes. */
  private armFlushTimer(): void {
    if (this.flushTimer || this.closed) return;
    this.flushTimer = setTimeout(() => {
      this.flushTimer = null;
      this.flushDue = true;
      void this.pump();
    }, this.o.flushIntervalMs);
    this.flushTimer.unref();
  }

  /**
   * Sends what is queued now (to the database, or the spool) and, with the database reachable,
   * replays the spool. Resolves when nothing more can be done at the moment.
   */
  async flush(): Promise<void> {
    for (let i = 0; i < 100_000; i++) {
      if (this.initialConnect && !this.closed) await this.initialConnectSettled;
      this.flushDue = true;
      await this.pump();
      const replayable = !this.closed && this.canReplay();
      if (this.queued === 0 && !replayable) return;
      if (this.queued > 0 && Date.now() < this.stuckUntil) return;
      if (this.queued === 0 && Date.now() < this.replayRetryAt) return;
    }
  }

  /** Flushes what it can, spools the rest, and closes. Records that fit nowhere are counted as dropped. */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    this.closed = true;
    for (const t of [this.flushTimer, this.retryTimer, this.connectTimer]) if (t) clearTimeout(t);
    this.stuckUntil = 0;
    this.spoolRetryAt = 0;
    await this.flush();
    if (this.queued > 0) {
      // Last chance: the spool may have failed only transiently.
      this.stuckUntil = 0;
      this.spoolRetryAt = 0;
      await this.flush();
    }
    const left = this.take(this.queued);
    if (left.length) this.drop(left, 'trustgate stopped while neither the database nor the spool could take them');
    await this.replayIter?.return(undefined);
    this.conn?.terminate();
    this.conn = null;
    await this.spool?.close();
  }

  // ------------------------------------------------------------ queue

  private take(n: number): AuditEntry[] {
    const batch = this.q.slice(this.qHead, this.qHead + n);
    this.qHead += batch.length;
    if (this.qHead === this.q.length) {
      this.q = [];
      this.qHead = 0;
    } else if (this.qHead > 4096 && this.qHead * 2 > this.q.length) {
      this.q = this.q.slice(this.qHead);
      this.qHead = 0;
    }
    for (const e of batch) if (e.waiter) this.waiting--;
    return batch;
  }

  private requeueFront(batch: AuditEntry[]): void {
    this.q = batch.concat(this.q.slice(this.qHead));
    this.qHead = 0;
    for (const e of batch) if (e.waiter) this.waiting++;
  }

  private setAccepting(v: boolean): void {
    if (this.accepting_ === v) return;
    this.accepting_ = v;
    if (v) this.o.log.warn({ queued: this.queued }, 'audit queue below its limit again: accepting requests');
    else this.o.log.error({ queued: this.queued, max: this.o.maxQueueRecords }, 'audit queue full (the database cannot take the records fast enough and the spool cannot take them): refusing new requests (audit.on_overflow: refuse)');
    this.emit('accepting', v);
  }

  private drop(entries: AuditEntry[], reason: string): void {
    this.stats.dropped += entries.length;
    const err = new Error(`audit record dropped: ${reason}`);
    for (const e of entries) e.waiter?.reject(err);
    this.loud('drop', `audit records dropped: ${reason}`, { dropped: entries.length, droppedTotal: this.stats.dropped });
    this.emit('dropped', entries.length);
  }

  /** log.error, at most every LOUD_EVERY_MS per kind, with the count of the ones not logged. */
  private loud(kind: string, msg: string, fields: Record<string, unknown> = {}): void {
    this.stats.lastError = msg;
    const now = Date.now();
    const l = this.lastLoud.get(kind);
    if (l && now - l.at < LOUD_EVERY_MS) {
      l.suppressed++;
      return;
    }
    this.o.log.error({ ...fields, instance: this.o.instance, ...(l?.suppressed ? { similarSinceLastLog: l.suppressed } : {}) }, msg);
    this.lastLoud.set(kind, { at: now, suppressed: 0 });
  }

  private kick(): void {
    if (this.kickPending) return;
    this.kickPending = true;
    setImmediate(() => {
      this.kickPending = false;
      void this.pump();
    });
  }

  // ------------------------------------------------------------ the pump (one operation at a time)

  /** Runs until nothing can be done now; concurrent calls share one run (and make it go round again). */
  private pump(): Promise<void> {
    if (this.pumping) {
      this.pumpAgain = true;
      return this.pumping;
    }
    this.pumping = (async () => {
      // Never finish synchronously: `pumping` must be assigned before the finally clears it.
      await Promise.resolve();
      try {
        do {
          this.pumpAgain = false;
          for (;;) {
            const live = this.takeLive();
            if (live) {
              if (!(await this.writeLive(live))) break;
              continue;
            }
            if (!this.closed && this.canReplay() && Date.now() >= this.replayRetryAt && (await this.replayStep())) continue;
            break;
          }
        } while (this.pumpAgain && Date.now() >= this.stuckUntil);
      } catch (err) {
        this.loud('pump', `audit writer error: ${(err as Error).message}`);
      } finally {
        this.pumping = null;
        // A remainder smaller than a batch (the rest after a full batch) still goes out in time.
        if (this.queued > 0) this.armFlushTimer();
      }
    })();
    return this.pumping;
  }

  private takeLive(): AuditEntry[] | null {
    const n = this.queued;
    if (n === 0) {
      this.flushDue = false;
      return null;
    }
    if (Date.now() < this.stuckUntil || (this.initialConnect && !this.closed)) return null;
    if (!this.flushDue && n < this.o.batchSize && this.waiting === 0) return null;
    const batch = this.take(Math.min(n, this.o.batchSize));
    if (this.queued === 0) this.flushDue = false;
    return batch;
  }

  /** Database, else spool, else (spool failing) database anyway; false when both failed. */
  private async writeLive(batch: AuditEntry[]): Promise<boolean> {
    const items: Item[] = batch.map((e) => ({ log: e.log, entry: e }));
    let triedDb = false;
    // A database that commits each batch in time but cannot keep up with the load is slow too:
    // past half of max_queue_records the backlog goes to the spool (replayed as load allows)
    // instead of growing in memory until requests are refused.
    const behind = this.spool !== null && this.queued + batch.length >= this.o.maxQueueRecords / 2 && Date.now() >= this.spoolRetryAt;
    if (this.dbUp() && !this.spool?.pending && !behind) {
      triedDb = true;
      if (await this.insert(items, this.o.spoolAfterMs)) {
        this.noteLiveInsert(batch.length);
        this.settle(batch);
        return true;
      }
    }
    if (this.spool && Date.now() >= this.spoolRetryAt) {
      try {
        await this.spool.append(`${items.map((i) => this.lineOf(i)).join('\n')}\n`);
        this.stats.spooled += batch.length;
        this.settle(batch);
        return true;
      } catch (err) {
        this.stats.failures++;
        this.spoolRetryAt = Date.now() + SPOOL_RETRY_MS;
        this.loud('spool', `audit spool append failed: ${(err as Error).message}`, { dir: this.o.spoolDir });
      }
    }
    if (!triedDb && this.dbUp()) {
      if (await this.insert(items, this.o.spoolAfterMs)) {
        this.noteLiveInsert(batch.length);
        this.settle(batch);
        return true;
      }
    }
    // Nowhere to put them now: they stay first in the queue; try again a little later.
    this.requeueFront(batch);
    const delay = this.spool ? SPOOL_RETRY_MS : RETRY_MS[Math.min(this.failStreak, RETRY_MS.length - 1)];
    this.stuckUntil = Date.now() + delay;
    if (!this.retryTimer && !this.closed) {
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.stuckUntil = 0;
        void this.pump();
      }, delay);
      this.retryTimer.unref();
    }
    return false;
  }

  private settle(batch: AuditEntry[]): void {
    for (const e of batch) e.waiter?.resolve(e.logId);
    // Accept again once the backlog really shrinks (not on a batch that goes back to the queue).
    if (!this.accepting_ && this.queued < this.o.maxQueueRecords * 0.9) this.setAccepting(true);
  }

  // ------------------------------------------------------------ replay

  private canReplay(): boolean {
    return this.spool !== null && this.spool.pending && this.dbUp();
  }

  /** One batch of the spool into the database; false when nothing was done (or it failed). */
  private async replayStep(): Promise<boolean> {
    const spool = this.spool!;
    try {
      if (!this.replayIter) {
        const file = await spool.nextReplayFile();
        if (!file) return false;
        this.replayFile = file;
        this.replayIter = spool.read(file, this.o.batchSize);
        this.o.log.info({ file }, 'audit spool: replaying into the database');
      }
      const next = await this.replayIter.next();
      if (next.done) {
        const file = this.replayFile!;
        this.replayIter = null;
        this.replayFile = null;
        await spool.replayed(file);
        if (!spool.pending) this.o.log.info({ replayed: this.stats.replayed }, 'audit spool replayed: every spooled record is in the database');
        return true;
      }
      const batch = next.value;
      for (const r of batch) this.o.ids.atLeast(r.logId);
      if (!(await this.insert(batch, REPLAY_TIMEOUT_MS))) {
        // The file stays; the next replay starts it again from the top (ON CONFLICT: no doubles).
        await this.abandonReplay();
        return false;
      }
      this.stats.replayed += batch.length;
      return true;
    } catch (err) {
      await this.abandonReplay();
      this.replayRetryAt = Date.now() + SPOOL_RETRY_MS;
      this.loud('replay', `audit spool replay failed: ${(err as Error).message}`, { dir: this.o.spoolDir });
      return false;
    }
  }

  private async abandonReplay(): Promise<void> {
    const it = this.replayIter;
    this.replayIter = null;
    this.replayFile = null;
    await it?.return(undefined).catch(() => undefined);
  }

  // ------------------------------------------------------------ database

  private dbUp(): boolean {
    return this.conn !== null && !this.conn.closed;
  }

  /** One statement for the batch; true when committed (new rows or rows already there). */
  /**
   * A fresh batch whose ids exist already can only mean that another gateway writes under the same
   * instance name (ids are per instance): those records were not stored — say so loudly.
   */
  private noteLiveInsert(sent: number): void {
    const lost = sent - this.lastInserted;
    this.stats.written += this.lastInserted;
    if (lost > 0) {
      this.stats.duplicates -= lost;
      this.stats.dropped += lost;
      this.loud('collision', `audit: ${lost} records were not stored because records with their ids exist already: another gateway writes as instance "${this.o.instance}" (give each gateway its own audit.instance)`, { instance: this.o.instance });
    }
  }

  private async insert(items: Item[], timeoutMs: number): Promise<boolean> {
    const conn = this.conn;
    if (!conn || conn.closed) return false;
    try {
      const res = await conn.internalQuery(...this.insertStatement(items), timeoutMs);
      const row = res.rows[0] ?? [];
      const inserted = Number(row[0] ?? 0) + Number(row[1] ?? 0);
      this.lastInserted = inserted;
      this.stats.duplicates += items.length - inserted;
      this.failStreak = 0;
      return true;
    } catch (err) {
      const code = (err as { serverError?: { code: string } }).serverError?.code;
      if (code && isDataError(code) && items.length > 1) return this.insertOneByOne(items, timeoutMs);
      if (code && isDataError(code)) {
        this.lastInserted = items.length; // counted as rejected, not as lost
        await this.reject(items, err as Error);
        return true;
      }
      this.dbFailed(conn, err as Error);
      return false;
    }
  }

  /** The JSON line of an item (made once; shared with the spool and JSON lines). */
  private lineOf(i: Item): string {
    return (i.line ??= this.o.formatter.line(i.entry!));
  }

  /**
   * Live records go as column arrays (INSERT_COLUMNS_SQL: cheaper for PostgreSQL, and no JSON line
   * is made); records read back from the spool as the JSON lines they are (INSERT_BATCH_SQL).
   */
  private insertStatement(items: Item[]): [string, string[]] {
    if (items.every((i) => i.entry !== undefined)) {
      const q: Record<string, unknown>[] = [];
      const a: Record<string, unknown>[] = [];
      for (const i of items) (i.log === 'query' ? q : a).push(this.o.formatter.row(i.entry!));
      const params: string[] = [];
      columnArrays(q, QUERY_COLUMN_NAMES, params);
      columnArrays(a, ACCESS_COLUMN_NAMES, params);
      return [INSERT_COLUMNS_SQL, params];
    }
    const q: string[] = [];
    const a: string[] = [];
    for (const i of items) (i.log === 'query' ? q : a).push(this.lineOf(i));
    return [INSERT_BATCH_SQL, [`[${q.join(',')}]`, `[${a.join(',')}]`]];
  }

  /** A batch with an invalid record: each alone, so one bad record cannot block the others. */
  private async insertOneByOne(items: Item[], timeoutMs: number): Promise<boolean> {
    let stored = 0;
    for (const item of items) {
      if (!(await this.insert([item], timeoutMs))) return false;
      stored += this.lastInserted;
    }
    this.lastInserted = stored;
    return true;
  }

  private async reject(items: Item[], err: Error): Promise<void> {
    this.stats.rejected += items.length;
    let file: string | null = null;
    if (this.o.spoolDir) {
      file = path.join(this.o.spoolDir, `${this.spool!.name}.rejected.jsonl`);
      await fsp.appendFile(file, `${items.map((i) => this.lineOf(i)).join('\n')}\n`, { mode: 0o600 }).catch(() => (file = null));
    }
    this.loud('reject', `audit records refused by the database as invalid: ${err.message}`, { rejected: items.length, keptIn: file });
  }

  private dbFailed(conn: ServerConnection, err: Error): void {
    this.stats.failures++;
    this.failStreak++;
    this.loud('db', `audit write to the database failed: ${err.message}`, { database: this.o.database });
    // Reconnect with backoff (the close listener does it), whatever the cause: a fresh start.
    if (this.conn === conn) this.conn = null;
    conn.destroy();
    this.connect();
  }

  private connect(): void {
    if (this.closed || this.connecting || this.dbUp()) return;
    this.connecting = true;
    const delay = this.failStreak === 0 ? 0 : RETRY_MS[Math.min(this.failStreak - 1, RETRY_MS.length - 1)];
    this.connectTimer = setTimeout(() => {
      this.connectTimer = null;
      void this.tryConnect();
    }, delay);
    this.connectTimer.unref();
  }

  private async tryConnect(): Promise<void> {
    let conn: ServerConnection | null = null;
    try {
      const c = this.o.credentials;
      conn = await ServerConnection.connect(this.o.endpoint, this.o.database, c.user, { password: c.password }, new Map([['application_name', 'trustgate audit']]), this.o.log);
      // Ids continue above what this instance already wrote (a clock stepped back, see log-id.ts).
      // "Committed" must mean durable: with synchronous_commit off, a crash of PostgreSQL could lose
      // records the writer already let go of (stricter settings such as remote_apply are kept).
      await conn.internalQuery("DO $$ BEGIN IF current_setting('synchronous_commit') = 'off' THEN PERFORM set_config('synchronous_commit', 'local', false); END IF; END $$");
      const hw = await conn.internalQuery(HIGH_WATER_SQL, [this.o.instance]);
      const high = hw.rows[0]?.[0];
      if (high) this.o.ids.atLeast(Number(high));
    } catch (err) {
      conn?.terminate();
      this.connecting = false;
      this.stats.failures++;
      this.failStreak++;
      if (this.closed) return;
      this.loud('db', `audit database unreachable: ${(err as Error).message}`, { database: this.o.database });
      this.endInitialConnect();
      this.connect();
      return;
    }
    this.connecting = false;
    if (this.closed) {
      conn.terminate();
      return;
    }
    const wasDown = this.failStreak > 0;
    this.conn = conn;
    const c = conn;
    conn.addCloseListener(() => {
      if (this.conn !== c) return;
      this.conn = null;
      this.failStreak++;
      this.connect();
    });
    if (wasDown) this.o.log.warn({ database: this.o.database }, 'audit database reachable again');
    this.stuckUntil = 0;
    this.replayRetryAt = 0;
    this.endInitialConnect();
    this.kick();
  }
}
