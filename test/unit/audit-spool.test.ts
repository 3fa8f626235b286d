/**
 * The audit spool on a local directory: line parsing, an unfinished last line (crash mid-write),
 * append + rotate + replay + delete, and what a new process finds after a crash.
 */
import { describe, it, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Spool, parseSpoolLine, parseSpoolText, readSpoolFile, type SpoolRecord } from '../../src/audit/spool.js';
import { createLogger } from '../../src/log/logger.js';
import { Writable } from 'node:stream';

const line = (id: number, log = 'query') => JSON.stringify({ log, log_id: id, instance: 'gw', statement_text: `SELECT ${id} -- ✓` });

function capture(): { log: ReturnType<typeof createLogger>; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _e, cb) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { log: createLogger('info', sink), lines };
}

async function all(gen: AsyncGenerator<SpoolRecord[]>): Promise<SpoolRecord[][]> {
  const out: SpoolRecord[][] = [];
  for await (const b of gen) out.push(b);
  return out;
}

describe('spool lines', () => {
  it('parses records and refuses anything else', () => {
    assert.deepEqual(parseSpoolLine(line(7)), { log: 'query', logId: 7, line: line(7) });
    assert.equal(parseSpoolLine(line(7, 'other')), null);
    assert.equal(parseSpoolLine('{"log":"query"}'), null);
    assert.equal(parseSpoolLine('{"log":"query","log_id":1.5}'), null);
    assert.equal(parseSpoolLine('{"log":"query","log_'), null);
    assert.equal(parseSpoolLine('null'), null);
  });

  it('splits text into complete lines and the unfinished rest', () => {
    const text = `${line(1)}\n\n${line(2, 'access')}\nnot json\n${line(3).slice(0, 20)}`;
    const r = parseSpoolText(text);
    assert.deepEqual(
      r.records.map((x) => [x.log, x.logId]),
      [
        ['query', 1],
        ['access', 2],
      ],
    );
    assert.equal(r.bad, 1);
    assert.equal(r.rest, line(3).slice(0, 20));
  });
});

describe('spool files', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-spool-test-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads in batches across chunk boundaries, and skips an unfinished last line with a warning', async () => {
    const file = path.join(dir, 'x.jsonl');
    const n = 5000; // > one 256 KiB read chunk
    fs.writeFileSync(file, Array.from({ length: n }, (_, i) => `${line(i + 1)}\n`).join('') + line(n + 1).slice(0, 30));
    let partial = 0;
    let bad = 0;
    const batches = await all(readSpoolFile(file, 1000, (b) => (bad += b), () => partial++));
    assert.equal(batches.length, 5);
    assert.deepEqual(
      batches.flat().map((r) => r.logId),
      Array.from({ length: n }, (_, i) => i + 1),
    );
    assert.equal(partial, 1);
    assert.equal(bad, 0);
  });

  it('appends, rotates for replay, keeps appending meanwhile, and deletes only when told', async () => {
    const { log } = capture();
    const spool = new Spool(dir, 'host:6432', log);
    await spool.open();
    assert.equal(spool.pending, false);
    await spool.append(`${line(1)}\n${line(2)}\n`);
    assert.equal(spool.pending, true);
    const first = await spool.nextReplayFile();
    assert.ok(first && path.basename(first).startsWith('host_6432.replay-'));
    await spool.append(`${line(3)}\n`); // lands in a new current file
    assert.deepEqual((await all(spool.read(first, 10))).flat().map((r) => r.logId), [1, 2]);
    // Not yet confirmed: the same file is offered again (a crash here replays it again).
    assert.equal(await spool.nextReplayFile(), first);
    await spool.replayed(first);
    const second = await spool.nextReplayFile();
    assert.ok(second && second !== first);
    assert.deepEqual((await all(spool.read(second, 10))).flat().map((r) => r.logId), [3]);
    await spool.replayed(second);
    assert.equal(spool.pending, false);
    assert.equal(await spool.nextReplayFile(), null);
    await spool.close();
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  it('a new process finds unfinished replays and the current file, oldest first', async () => {
    const { log, lines } = capture();
    const a = new Spool(dir, 'gw', log);
    await a.append(`${line(1)}\n`);
    const r1 = await a.nextReplayFile(); // "crash" in the middle of replaying r1
    await a.append(`${line(2)}\n${line(3).slice(0, 25)}`); // and in the middle of a write
    await a.close();

    const b = new Spool(dir, 'gw', log);
    await b.open();
    assert.equal(b.pending, true);
    assert.ok(lines.some((l) => /earlier run/.test(String(l.msg))));
    assert.equal(await b.nextReplayFile(), r1);
    assert.deepEqual((await all(b.read(r1!, 10))).flat().map((r) => r.logId), [1]);
    await b.replayed(r1!);
    const r2 = await b.nextReplayFile();
    assert.deepEqual((await all(b.read(r2!, 10))).flat().map((r) => r.logId), [2]);
    assert.ok(lines.some((l) => l.level === 40 && /unfinished last line/.test(String(l.msg))), 'a warning names the partial line');
    await b.replayed(r2!);
    await b.close();
  });

  it('an append after a crash mid-line starts on a line of its own', async () => {
    const { log, lines } = capture();
    fs.writeFileSync(path.join(dir, 'gw.jsonl'), `${line(1)}\n${line(2).slice(0, 10)}`);
    const s = new Spool(dir, 'gw', log);
    await s.append(`${line(3)}\n`);
    const f = await s.nextReplayFile();
    assert.deepEqual((await all(s.read(f!, 10))).flat().map((r) => r.logId), [1, 3]);
    assert.ok(lines.some((l) => /not valid records/.test(String(l.msg))));
    await s.close();
  });

  it('append fails in an unwritable directory (the writer then keeps the records)', async () => {
    const { log } = capture();
    const blocker = path.join(dir, 'file');
    fs.writeFileSync(blocker, 'x');
    const s = new Spool(path.join(blocker, 'spool'), 'gw', log);
    await assert.rejects(s.append(`${line(1)}\n`));
  });
});
