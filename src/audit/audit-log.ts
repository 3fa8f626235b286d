/**
 * `gateway.audit`: what sessions call to record a request (query log) or a privilege decision
 * (access log). It gives each record its log id, then hands it to the database writer and/or the
 * JSON lines sink. Every call is synchronous and O(1); the `…AndWait` forms are for strict audit
 * (`audit.synchronous: true`): they resolve once the record is committed in the database or
 * fsync'd to the spool (JSON lines only: once written to the stream).
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../log/logger.js';
import { LogIdGenerator } from './log-id.js';
import { EntryFormatter, type AccessLogInput, type AuditEntry, type LogKind, type QueryLogInput } from './records.js';
import { AuditWriter, type AuditWriterStats } from './writer.js';
import { JsonLinesSink, type JsonLinesStats } from './json-lines.js';
import type { AuditSettings } from './settings.js';
import { loadSqlParser } from '../sql/classify.js';

export interface AuditStats {
  enabled: boolean;
  instance: string | null;
  synchronous: boolean;
  accepting: boolean;
  /** Null without a database destination. */
  database: (AuditWriterStats & { name: string }) | null;
  /** Null without JSON lines. */
  jsonLines: (JsonLinesStats & { target: string }) | null;
}

export class AuditLog extends EventEmitter {
  /** False: query()/access() do nothing (sessions should not even build the record). */
  enabled = false;
  /** Sessions should use queryAndWait()/accessAndWait() and hold the reply until they resolve. */
  synchronous = false;
  private settings: AuditSettings | null = null;
  private writer: AuditWriter | null = null;
  private sink: JsonLinesSink | null = null;
  private formatter: EntryFormatter | null = null;
  private readonly ids = new LogIdGenerator();
  private readonly retiring = new Set<Promise<void>>();

  constructor(private readonly log: Logger) {
    super();
  }

  /** Applies settings (start and reload). Sinks are rebuilt only when their shape changed. */
  configure(s: AuditSettings): void {
    const prev = this.settings;
    this.settings = s;
    // Fingerprints use the parser (the gateway has loaded it already; a standalone use may not have).
    void loadSqlParser();
    this.enabled = s.enabled && (s.database !== null || s.jsonLines !== null);
    this.synchronous = s.synchronous;
    const writerKey = (x: AuditSettings | null) =>
      x && x.enabled && x.database
        ? JSON.stringify([x.instance, x.database, x.spoolDir, x.flushIntervalMs, x.batchSize, x.spoolAfterMs, x.maxQueueRecords, x.onOverflow])
        : null;
    const sinkKey = (x: AuditSettings | null) => (x && x.enabled && x.jsonLines ? JSON.stringify([x.instance, x.jsonLines]) : null);
    const rebuildWriter = writerKey(prev) !== writerKey(s);
    const rebuildSink = sinkKey(prev) !== sinkKey(s);
    if (!this.formatter || prev?.instance !== s.instance) this.formatter = new EntryFormatter(s.instance, s.policy);
    else this.formatter.policy = s.policy; // a new policy applies to records formatted from now on
    if (rebuildWriter) {
      const retired = this.retire(this.writer);
      this.writer = null;
      if (writerKey(s) !== null) {
        const db = s.database!;
        const w = new AuditWriter({
          instance: s.instance,
          endpoint: db.endpoint,
          database: db.name,
          credentials: db.credentials,
          spoolDir: s.spoolDir,
          formatter: this.formatter,
          ids: this.ids,
          flushIntervalMs: s.flushIntervalMs,
          batchSize: s.batchSize,
          spoolAfterMs: s.spoolAfterMs,
          maxQueueRecords: s.maxQueueRecords,
          onOverflow: s.onOverflow,
          log: this.log,
        });
        w.on('accepting', (v: boolean) => this.emit('accepting', v));
        w.on('dropped', (n: number) => this.emit('dropped', n));
        // The old writer may still append to the same spool: start (and replay) once it has closed.
        void retired.then(() => w.start());
        this.writer = w;
      }
    }
    if (rebuildSink) {
      this.retire(this.sink);
      this.sink = null;
      if (sinkKey(s) !== null) {
        try {
          this.sink = new JsonLinesSink(s.jsonLines!.path, this.formatter, this.log, s.jsonLines!.maxBufferBytes);
        } catch (err) {
          this.log.error({ path: s.jsonLines!.path, err: (err as Error).message }, 'audit JSON lines: cannot open the destination');
        }
      }
    }
    if (s.enabled && !this.enabled) this.log.warn('audit.enabled is true but the audit log has no destination (audit.database needs auth.user; or set audit.json_lines)');
  }

  /** False when the audit queue is full under `on_overflow: refuse`: refuse new requests (53400). */
  get accepting(): boolean {
    return this.writer?.accepting ?? true;
  }

  get instance(): string | null {
    return this.settings?.instance ?? null;
  }

  /** Records a request; returns its log id (0 when audit is off). */
  query(r: QueryLogInput): number {
    return this.record('query', r, null);
  }

  /** Records a privilege decision; returns its log id (0 when audit is off). */
  access(r: AccessLogInput): number {
    return this.record('access', r, null);
  }

  /** Like query(), resolved when the record is safe (committed or fsync'd); rejected if it was dropped. */
  queryAndWait(r: QueryLogInput): Promise<number> {
    return this.recordAndWait('query', r);
  }

  accessAndWait(r: AccessLogInput): Promise<number> {
    return this.recordAndWait('access', r);
  }

  recordAndWait(log: LogKind, input: QueryLogInput | AccessLogInput): Promise<number> {
    if (!this.enabled) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      this.record(log, input, { resolve, reject });
    });
  }

  private record(log: LogKind, input: QueryLogInput | AccessLogInput, waiter: AuditEntry['waiter'] | null): number {
    if (!this.enabled) return 0;
    const logId = this.ids.next();
    const e: AuditEntry = waiter ? { log, logId, input, madeAt: Date.now(), waiter } : { log, logId, input, madeAt: Date.now() };
    if (this.writer) this.writer.enqueue(e);
    if (this.sink) this.sink.enqueue(e, !this.writer);
    return logId;
  }

  stats(): AuditStats {
    const s = this.settings;
    return {
      enabled: this.enabled,
      instance: s?.instance ?? null,
      synchronous: this.synchronous,
      accepting: this.accepting,
      database: this.writer && s?.database ? { name: s.database.name, ...this.writer.snapshot() } : null,
      jsonLines: this.sink ? { target: this.sink.target, ...this.sink.stats } : null,
    };
  }

  /** Sends what is queued (database or spool; JSON lines written) and replays the spool if it can. */
  async flush(): Promise<void> {
    await Promise.all([this.writer?.flush(), this.sink?.flush()]);
  }

  /** Flushes, spools what the database cannot take, and closes (gateway stop). */
  async close(): Promise<void> {
    this.enabled = false;
    this.retire(this.writer);
    this.retire(this.sink);
    this.writer = null;
    this.sink = null;
    await Promise.all([...this.retiring]);
  }

  private retire(x: { close(): Promise<void> } | null): Promise<void> {
    if (!x) return Promise.resolve();
    const p: Promise<void> = x.close().catch((err: Error) => this.log.error({ err: err.message }, 'closing the audit log failed'));
    this.retiring.add(p);
    void p.finally(() => this.retiring.delete(p));
    return p;
  }
}
