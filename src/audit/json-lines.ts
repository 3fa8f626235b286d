/**
 * JSON lines for log shippers: every audit record as one JSON object per line — the row's
 * snake_case columns plus `"log": "query" | "access"` — to stdout (`path: '-'`) or appended to a
 * file. Same line as the spool's, formatted once per record.
 *
 * Off the request path: `enqueue()` pushes; lines are formatted and written in one write per
 * turn of the event loop. Bounded: when the destination does not keep up and more than
 * `maxBufferBytes` wait in the stream, records are dropped, counted, with a loud error.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log/logger.js';
import type { AuditEntry, EntryFormatter } from './records.js';

export interface JsonLinesStats {
  written: number;
  dropped: number;
  failures: number;
}

const DEFAULT_MAX_BUFFER_BYTES = 16 * 1024 * 1024;
const LOUD_EVERY_MS = 5_000;

export class JsonLinesSink {
  private pending: { e: AuditEntry; settle: boolean }[] = [];
  private scheduled = false;
  private readonly stream: NodeJS.WritableStream & { writableLength?: number };
  private readonly ownsStream: boolean;
  private broken: Error | null = null;
  private lastLoud = 0;
  private closed = false;
  readonly stats: JsonLinesStats = { written: 0, dropped: 0, failures: 0 };

  constructor(
    readonly target: string,
    private readonly formatter: EntryFormatter,
    private readonly log: Logger,
    private readonly maxBufferBytes = DEFAULT_MAX_BUFFER_BYTES,
    stdout: NodeJS.WritableStream = process.stdout,
  ) {
    if (target === '-') {
      this.stream = stdout;
      this.ownsStream = false;
    } else {
      fs.mkdirSync(path.dirname(path.resolve(target)), { recursive: true });
      const s = fs.createWriteStream(target, { flags: 'a', mode: 0o600 });
      s.on('error', (err) => {
        this.broken = err;
        this.stats.failures++;
        this.loud(`audit JSON lines file ${target} failed: ${err.message}`);
      });
      this.stream = s;
      this.ownsStream = true;
    }
  }

  /** Queues a record (O(1)). `settle`: this sink tells a synchronous caller when it is written. */
  enqueue(e: AuditEntry, settle = false): void {
    if (this.closed) {
      this.dropAll([{ e, settle }], 'the JSON lines sink is closed');
      return;
    }
    this.pending.push({ e, settle });
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.write());
    }
  }

  /** Writes what is queued and waits until the stream has taken it. */
  async flush(): Promise<void> {
    this.write();
    if (this.broken) return;
    // An empty write's callback runs once everything written before it has been handed over.
    await new Promise<void>((resolve) => this.stream.write('', () => resolve()));
  }

  async close(): Promise<void> {
    await this.flush();
    this.closed = true;
    if (this.ownsStream && !this.broken) await new Promise<void>((resolve) => this.stream.end(() => resolve()));
  }

  private write(): void {
    this.scheduled = false;
    const batch = this.pending;
    if (batch.length === 0) return;
    this.pending = [];
    if (this.broken) {
      this.dropAll(batch, `the destination failed: ${this.broken.message}`);
      return;
    }
    if ((this.stream.writableLength ?? 0) > this.maxBufferBytes) {
      this.dropAll(batch, `the destination does not keep up (more than ${this.maxBufferBytes} bytes waiting)`);
      return;
    }
    let text = '';
    for (const { e } of batch) text += `${this.formatter.line(e)}\n`;
    const settle = batch.filter((b) => b.settle);
    this.stream.write(text, (err?: Error | null) => {
      if (err) {
        this.dropAll(batch, err.message);
        return;
      }
      this.stats.written += batch.length;
      for (const { e } of settle) e.waiter?.resolve(e.logId);
    });
  }

  private dropAll(batch: { e: AuditEntry; settle: boolean }[], reason: string): void {
    this.stats.dropped += batch.length;
    const err = new Error(`audit JSON line dropped: ${reason}`);
    for (const { e, settle } of batch) if (settle) e.waiter?.reject(err);
    this.loud(`audit JSON lines dropped: ${reason}`, { dropped: batch.length, droppedTotal: this.stats.dropped });
  }

  private loud(msg: string, fields: Record<string, unknown> = {}): void {
    const now = Date.now();
    if (now - this.lastLoud < LOUD_EVERY_MS) return;
    this.lastLoud = now;
    this.log.error({ ...fields, target: this.target }, msg);
  }
}
