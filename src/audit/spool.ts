/**
 * The local spool: where audit records go while the database cannot take them, so that a
 * record handed to the spool survives a crash of trustgate and reaches the database later.
 *
 * Files in `dir`, per instance `<name>`:
 *   <name>.jsonl                   the current file, append-only: one JSON line per record
 *                                  (the JSON-lines format, `log` + the row), fsync'd per batch
 *   <name>.replay-<time>-<n>.jsonl a file being replayed (renamed from the current one)
 *
 * Replay: the current file is renamed (atomically, directory fsync'd) to a replay file, so new
 * appends go to a fresh current file; the replay file is read in batches, each batch inserted with
 * ON CONFLICT DO NOTHING, and only when every batch of the file is committed is the file deleted.
 * A crash in the middle leaves the replay file in place and it is replayed again from the start
 * on the next run — idempotent, so nothing is lost and nothing doubled. Replay files are replayed
 * oldest first, then the current file: the spool's order.
 *
 * A line cut short by a crash in the middle of a write (no trailing newline) is ignored with a
 * warning; it was never confirmed as spooled to anyone. A failed append is truncated away so a
 * later append cannot be glued onto half a line.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log/logger.js';
import type { LogKind } from './records.js';

/** One record read back from the spool: its kind, id and the line as written. */
export interface SpoolRecord {
  log: LogKind;
  logId: number;
  line: string;
}

export interface ParsedSpoolText {
  records: SpoolRecord[];
  /** Bytes after the last newline: an unfinished line (kept by the reader for the next chunk). */
  rest: string;
  /** Complete lines that are not valid records (counted and skipped). */
  bad: number;
}

/** Parses one spool line; null when it is not a valid record. */
export function parseSpoolLine(line: string): SpoolRecord | null {
  if (line.length === 0) return null;
  try {
    const v = JSON.parse(line) as { log?: unknown; log_id?: unknown };
    if (v === null || typeof v !== 'object' || (v.log !== 'query' && v.log !== 'access') || typeof v.log_id !== 'number' || !Number.isSafeInteger(v.log_id)) return null;
    return { log: v.log, logId: v.log_id, line };
  } catch {
    return null;
  }
}

/** Splits text into complete lines (parsed) and the unfinished rest. Empty lines are skipped. */
export function parseSpoolText(text: string): ParsedSpoolText {
  const records: SpoolRecord[] = [];
  let bad = 0;
  let start = 0;
  for (;;) {
    const nl = text.indexOf('\n', start);
    if (nl < 0) break;
    const line = text.slice(start, nl);
    start = nl + 1;
    if (line.length === 0) continue;
    const r = parseSpoolLine(line);
    if (r) records.push(r);
    else bad++;
  }
  return { records, rest: text.slice(start), bad };
}

const CHUNK_BYTES = 256 * 1024;

/**
 * Reads a spool file in batches of at most `batchSize` records. A last line without a newline is
 * reported through `onPartial` and not returned.
 */
export async function* readSpoolFile(
  file: string,
  batchSize: number,
  onBad: (count: number) => void,
  onPartial: (bytes: number) => void,
): AsyncGenerator<SpoolRecord[]> {
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(CHUNK_BYTES);
    let carry = Buffer.alloc(0);
    let batch: SpoolRecord[] = [];
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, CHUNK_BYTES, null);
      if (bytesRead === 0) break;
      const data = carry.length ? Buffer.concat([carry, buf.subarray(0, bytesRead)]) : buf.subarray(0, bytesRead);
      // Split on the last newline in bytes, so a multi-byte character is never cut in two.
      const lastNl = data.lastIndexOf(0x0a);
      if (lastNl < 0) {
        carry = Buffer.from(data);
        continue;
      }
      const parsed = parseSpoolText(data.toString('utf8', 0, lastNl + 1));
      carry = Buffer.from(data.subarray(lastNl + 1));
      if (parsed.bad) onBad(parsed.bad);
      for (const r of parsed.records) {
        batch.push(r);
        if (batch.length >= batchSize) {
          yield batch;
          batch = [];
        }
      }
    }
    if (carry.length) onPartial(carry.length);
    if (batch.length) yield batch;
  } finally {
    await fh.close();
  }
}

const safeName = (s: string): string => s.replace(/[^A-Za-z0-9._-]/g, '_');

export interface SpoolStats {
  /** Bytes in spool files not yet replayed. */
  bytes: number;
  files: number;
  badLines: number;
  partialLines: number;
}

export class Spool {
  readonly name: string;
  private fh: fsp.FileHandle | null = null;
  /** Size of the current file (where the next append lands). */
  private size = 0;
  private replaySeq = 0;
  private opened = false;
  /** Replay files waiting, oldest first (names only). */
  private replayFiles: string[] = [];
  readonly stats: SpoolStats = { bytes: 0, files: 0, badLines: 0, partialLines: 0 };

  constructor(
    readonly dir: string,
    instance: string,
    private readonly log: Logger,
  ) {
    this.name = safeName(instance);
  }

  get currentPath(): string {
    return path.join(this.dir, `${this.name}.jsonl`);
  }

  /** True while records wait on disk for a replay. */
  get pending(): boolean {
    return this.replayFiles.length > 0 || this.size > 0;
  }

  /** Finds what a previous run left (current file, unfinished replays). Creates the directory. */
  async open(): Promise<void> {
    if (this.opened) return;
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const prefix = `${this.name}.replay-`;
    const names = await fsp.readdir(this.dir);
    this.replayFiles = names.filter((n) => n.startsWith(prefix) && n.endsWith('.jsonl')).sort();
    let bytes = 0;
    for (const n of this.replayFiles) bytes += (await fsp.stat(path.join(this.dir, n))).size;
    try {
      this.size = (await fsp.stat(this.currentPath)).size;
    } catch {
      this.size = 0;
    }
    this.stats.bytes = bytes + this.size;
    this.stats.files = this.replayFiles.length + (this.size > 0 ? 1 : 0);
    this.opened = true;
    if (this.pending) this.log.info({ dir: this.dir, files: this.stats.files, bytes: this.stats.bytes }, 'audit spool has records from an earlier run: replaying them when the database is reachable');
  }

  /**
   * Appends lines (each ending in '\n') and fsyncs: when this resolves, the records survive a
   * crash. Throws on failure (the caller keeps the records); the file is truncated back first.
   */
  async append(text: string): Promise<void> {
    if (!this.opened) await this.open();
    if (!this.fh) {
      this.fh = await fsp.open(this.currentPath, 'a+', 0o600);
      this.size = (await this.fh.stat()).size;
      // A previous run may have died mid-line: start on a line of our own.
      if (this.size > 0 && !(await this.endsWithNewline(this.fh, this.size))) {
        await this.fh.write('\n');
        this.size++;
      }
      await this.syncDir();
    }
    const before = this.size;
    const data = Buffer.from(text, 'utf8');
    try {
      let off = 0;
      while (off < data.length) {
        const { bytesWritten } = await this.fh.write(data, off, data.length - off, null);
        off += bytesWritten;
      }
      await this.fh.sync();
      this.size = before + data.length;
      this.stats.bytes += data.length;
      if (before === 0) this.stats.files++;
    } catch (err) {
      await this.fh.truncate(before).catch(() => this.closeCurrent());
      throw err;
    }
  }

  /**
   * The next file to replay (oldest first), or null when nothing waits. The current file becomes
   * a replay file by rename, so appends continue in a new current file meanwhile.
   */
  async nextReplayFile(): Promise<string | null> {
    if (!this.opened) await this.open();
    if (this.replayFiles.length === 0 && this.size > 0) {
      await this.closeCurrent();
      const name = `${this.name}.replay-${String(Date.now()).padStart(15, '0')}-${String(this.replaySeq++).padStart(6, '0')}.jsonl`;
      await fsp.rename(this.currentPath, path.join(this.dir, name));
      await this.syncDir();
      this.size = 0;
      this.replayFiles.push(name);
    }
    const next = this.replayFiles[0];
    return next === undefined ? null : path.join(this.dir, next);
  }

  /** Reads a replay file in batches (see readSpoolFile). */
  read(file: string, batchSize: number): AsyncGenerator<SpoolRecord[]> {
    return readSpoolFile(
      file,
      batchSize,
      (n) => {
        this.stats.badLines += n;
        this.log.warn({ file, lines: n }, 'audit spool: skipped lines that are not valid records');
      },
      (bytes) => {
        this.stats.partialLines++;
        this.log.warn({ file, bytes }, 'audit spool: ignored an unfinished last line (trustgate stopped in the middle of writing it; it was never confirmed)');
      },
    );
  }

  /** Every record of `file` is committed in the database: delete it. */
  async replayed(file: string): Promise<void> {
    const name = path.basename(file);
    let size = 0;
    try {
      size = (await fsp.stat(file)).size;
    } catch {
      /* already gone */
    }
    await fsp.rm(file, { force: true });
    await this.syncDir();
    this.replayFiles = this.replayFiles.filter((n) => n !== name);
    this.stats.bytes = Math.max(0, this.stats.bytes - size);
    this.stats.files = Math.max(0, this.stats.files - 1);
  }

  async close(): Promise<void> {
    await this.closeCurrent();
  }

  private async closeCurrent(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (fh) await fh.close().catch(() => undefined);
  }

  private async endsWithNewline(fh: fsp.FileHandle, size: number): Promise<boolean> {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, size - 1);
    return b[0] === 0x0a;
  }

  /** Makes a created, renamed or deleted file name durable. */
  private async syncDir(): Promise<void> {
    let dh: fsp.FileHandle | null = null;
    try {
      dh = await fsp.open(this.dir, 'r');
      await dh.sync();
    } catch {
      /* some file systems cannot fsync a directory; the data itself is synced */
    } finally {
      await dh?.close().catch(() => undefined);
    }
  }
}
