/**
 * The audit log's durability at the gateway level (issue 4): real clients through a real gateway.
 *
 * 1. PostgreSQL is stopped (fast shutdown; then again as a crash, SIGKILL) while node-postgres
 *    clients and a psql session send marked requests, and started again ~2 s later: every request
 *    the client got an answer for (a result, an error, or a FATAL that ended the connection) has
 *    exactly one row in trustgate.query_log with its result and SQLSTATE, no row is doubled, and
 *    the records really went through the spool; a FATAL trustgate sends itself is recorded with
 *    its SQLSTATE.
 * 2. A trustgate process (the CLI) whose audit database cannot take records spools them, is
 *    SIGKILLed, and a new process with the same spool directory and instance replays every one of
 *    them exactly once; a burst right before the kill shows the crash bound (records of the last
 *    flush interval may be lost, nothing older).
 *
 * Markers: every request's text carries `mk_<source>_<n>` (a column alias or a string literal),
 * and statement_text is stored in full, so the row of each request is found by its marker.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import pg from 'pg';
import { stringify } from 'yaml';
import { AUTH_ENV, AUTH_PASSWORD, AUTH_ROLE, USERS, preparePostgres, startGateway, stackOf } from './helpers/stack.js';
import { findFreePort, type EmbeddedPostgres } from './helpers/postgres.js';
import { installAuthFunction } from '../src/server/install.js';
import { createLogger } from '../src/log/logger.js';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const MARKER_RE = 'mk_[a-z0-9]+_[0-9]+';
/** The FATAL trustgate sends itself when a server connection closes under a request. */
const GATEWAY_FATAL = 'server closed the connection unexpectedly';

let db: EmbeddedPostgres;
let tmp: string;

before(async () => {
  // persistent: stop() keeps the data directory, so PostgreSQL can be stopped and started again.
  // synchronous_commit on (the embedded default is off): with it off, a crash of PostgreSQL loses
  // transactions it had already reported committed — audit batches included (seen: 47 records).
  db = await preparePostgres({ persistent: true, settings: { max_connections: 300, synchronous_commit: true } });
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-audit-durability-'));
});
after(async () => {
  const base = db?.baseDir;
  await db?.stop();
  if (base) fs.rmSync(base, { recursive: true, force: true });
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

/** What the client saw for one request. */
interface Outcome {
  marker: string;
  /** ok: a result; error: ErrorResponse + ReadyForQuery; fatal: a FATAL ErrorResponse, then the connection closed; none: no answer at all. */
  kind: 'ok' | 'error' | 'fatal' | 'none';
  code?: string;
  message?: string;
  via: 'simple' | 'extended' | 'psql';
}

interface Row {
  marker: string | null;
  n: number;
  results: string[];
  sqlstates: (string | null)[];
}

async function waitFor(what: string, fn: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** query_log rows of one instance grouped by marker (NULL = a row without a marker). */
async function rowsByMarker(instance: string): Promise<{ byMarker: Map<string, Row>; unmarked: number; total: number; distinctIds: number }> {
  const rows = await db.query<{ marker: string | null; n: string; results: string[]; sqlstates: (string | null)[] }>(
    `SELECT substring(statement_text from '${MARKER_RE}') AS marker, count(*) AS n,
            array_agg(result ORDER BY log_id) AS results, array_agg(sqlstate ORDER BY log_id) AS sqlstates
       FROM trustgate.query_log WHERE instance = $1 GROUP BY 1`,
    [instance],
  );
  const byMarker = new Map<string, Row>();
  let unmarked = 0;
  for (const r of rows) {
    if (r.marker === null) unmarked += Number(r.n);
    else byMarker.set(r.marker, { marker: r.marker, n: Number(r.n), results: r.results, sqlstates: r.sqlstates });
  }
  const [t] = await db.query<{ total: string; ids: string }>('SELECT count(*) AS total, count(DISTINCT log_id) AS ids FROM trustgate.query_log WHERE instance = $1', [instance]);
  return { byMarker, unmarked, total: Number(t!.total), distinctIds: Number(t!.ids) };
}

/** SHOW AUDIT in the admin console (database `trustgate`, admin user `app`). */
async function showAudit(port: number): Promise<Record<string, unknown>> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'app', password: USERS.app, database: 'trustgate' });
  c.on('error', () => undefined);
  await c.connect();
  try {
    return (await c.query('SHOW AUDIT')).rows[0] as Record<string, unknown>;
  } finally {
    await c.end().catch(() => undefined);
  }
}

const num = (v: unknown) => Number(v ?? 0);

/**
 * One node-postgres client: `quota` requests, one every `paceMs`, reconnecting whenever its
 * connection is gone (logins fail while PostgreSQL is down: the gateway looks up credentials in it).
 * With `sleepS`, each request also runs pg_sleep (a request likely to be running at the stop).
 */
async function nodeClient(port: number, id: number | string, quota: number, paceMs: number, deadline: number, out: Outcome[], sleepS = 0): Promise<void> {
  let client: pg.Client | null = null;
  let dead = false;
  let n = 0;
  while (n < quota && Date.now() < deadline) {
    if (!client || dead) {
      if (client) void client.end().catch(() => undefined);
      const c = new pg.Client({ host: '127.0.0.1', port, user: 'app', password: USERS.app, database: 'postgres', connectionTimeoutMillis: 5000 });
      dead = false;
      c.on('error', () => (dead = true));
      c.on('end', () => (dead = true));
      try {
        await c.connect();
        client = c;
      } catch {
        client = null;
        await sleep(100);
        continue;
      }
    }
    const marker = `mk_c${id}_${n}`;
    const extended = n % 3 === 2;
    n++;
    const via = extended ? 'extended' : 'simple';
    try {
      const value = sleepS > 0 ? `pg_sleep(${sleepS}), ` : '';
      if (extended) await client.query(`SELECT ${value}$1::int AS ${marker}`, [n]);
      else await client.query(`SELECT ${value}${n} AS ${marker}`);
      out.push({ marker, kind: 'ok', via });
    } catch (err) {
      const e = err as Error & { code?: string; severity?: string };
      if (/not queryable/.test(e.message)) {
        // Never sent: the connection was already gone.
        n--;
        dead = true;
        continue;
      }
      if (e.code) out.push({ marker, kind: e.severity === 'FATAL' ? 'fatal' : 'error', code: e.code, message: e.message, via });
      else out.push({ marker, kind: 'none', message: e.message, via });
      if (!e.code || e.severity === 'FATAL') dead = true;
    }
    await sleep(paceMs);
  }
  await client?.end().catch(() => undefined);
}

/**
 * psql reading statements from a pipe (one per line, `SELECT 'mk_p_<n>';`), one every `paceMs`.
 * psql without a terminal exits when its connection is lost; a new one takes the next statements.
 * Answers: the marker on stdout (a result) or `psql:<stdin>:<line>: ERROR|FATAL:  <SQLSTATE>:` on
 * stderr (VERBOSITY verbose), by line.
 */
async function psqlClient(port: number, quota: number, paceMs: number, deadline: number, out: Outcome[]): Promise<{ runs: number }> {
  let n = 0;
  let runs = 0;
  while (n < quota && Date.now() < deadline) {
    runs++;
    const child = spawn('psql', ['-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-h', '127.0.0.1', '-p', String(port), '-U', 'app', '-d', 'postgres', '-f', '-'], {
      env: { ...process.env, PGPASSWORD: USERS.app, PGCONNECT_TIMEOUT: '5' },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.stdin.on('error', () => undefined);
    let exited = false;
    const exit = once(child, 'exit').then(() => (exited = true));
    const killer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    const sent: string[] = [];
    while (!exited && n < quota && Date.now() < deadline) {
      const marker = `mk_p_${n++}`;
      sent.push(marker);
      child.stdin.write(`SELECT '${marker}';\n`);
      await sleep(paceMs);
    }
    child.stdin.end();
    await exit;
    clearTimeout(killer);
    const answered = new Set(stdout.split('\n').filter((l) => l.startsWith('mk_p_')));
    const errors = new Map<number, { kind: 'error' | 'fatal'; code: string; message: string }>();
    for (const m of stderr.matchAll(/^psql:<stdin>:(\d+): (ERROR|FATAL):\s+([0-9A-Z]{5}): (.*)$/gm)) {
      errors.set(Number(m[1]), { kind: m[2] === 'FATAL' ? 'fatal' : 'error', code: m[3]!, message: m[4]! });
    }
    let sawNothing = true;
    sent.forEach((marker, i) => {
      const e = errors.get(i + 1);
      if (answered.has(marker)) out.push({ marker, kind: 'ok', via: 'psql' });
      else if (e) out.push({ marker, kind: e.kind, code: e.code, message: e.message, via: 'psql' });
      else out.push({ marker, kind: 'none', message: stderr.split('\n').find((l) => l.includes(`<stdin>:${i + 1}:`)), via: 'psql' });
      if (answered.has(marker) || e) sawNothing = false;
    });
    // A psql that could not even log in (PostgreSQL down): its statements were never sent.
    if (sawNothing && /connection to server .* failed/.test(stderr)) {
      out.splice(out.length - sent.length, sent.length);
      n -= sent.length;
      await sleep(100);
    }
  }
  return { runs };
}

describe('audit durability through a real gateway', () => {
  /**
   * Clients send marked requests; once 250 were answered PostgreSQL is stopped (`stop`: fast shutdown, its
   * backends send FATAL 57P01; `kill`: SIGKILL, a crash: connections just close), and started
   * again 2 s later. Returns the requests answered with a FATAL and their rows.
   */
  async function outage(how: 'stop' | 'kill'): Promise<{ fatal: Outcome[]; rows: Map<string, Row> }> {
    const instance = `durability-pg-${how}`;
    const spoolDir = path.join(tmp, `spool-pg-${how}`);
    const { gw, logs } = await startGateway(db, {
      audit: { enabled: true, instance, spool_dir: spoolDir, flush_interval_ms: 50, spool_after_ms: 500 },
      // Requests waiting for a server during the outage get an ERROR (08001) after 1 s.
      pool: { mode: 'transaction', default_size: 4, wait_timeout_ms: 1000 },
    });
    const stack = stackOf(db, gw, logs, false);
    try {
      await waitFor('the audit writer connection', async () => gw.audit.stats().database?.database === 'up', 10_000);
      const outcomes: Outcome[] = [];
      const CLIENTS = 5;
      const QUOTA = 250;
      const PACE = 20;
      const began = Date.now();
      const deadline = began + 40_000;
      const SLOW = 20;
      const flows = [...Array(CLIENTS).keys()].map((i) => nodeClient(stack.port, i, QUOTA, PACE, deadline, outcomes));
      // Two clients whose requests run 150 ms on the server: busy when PostgreSQL stops.
      flows.push(nodeClient(stack.port, 's', SLOW, 0, deadline, outcomes, 0.15), nodeClient(stack.port, 't', SLOW, 0, deadline, outcomes, 0.15));
      const psql = psqlClient(stack.port, QUOTA, PACE, deadline, outcomes);

      // The flow is established (under load logins can be slow): then PostgreSQL goes away.
      await waitFor('requests flowing', async () => outcomes.length >= 250, 20_000);
      const answeredBefore = outcomes.length;
      const stopAt = Date.now();
      if (how === 'kill') await db.kill();
      else await db.stop();
      const stoppedAt = Date.now();
      await sleep(2000);
      const startAt = Date.now();
      await db.start();
      const upAt = Date.now();
      const psqlRuns = (await psql).runs;
      await Promise.all(flows);
      const flowEnd = Date.now();

      // The outcomes of requests sent while PostgreSQL was going down, down, or starting.
      const total = outcomes.length;
      const byKind = (k: Outcome['kind']) => outcomes.filter((o) => o.kind === k);
      const errorCodes = new Map<string, number>();
      for (const o of outcomes) if (o.code) errorCodes.set(`${o.kind}:${o.code}`, (errorCodes.get(`${o.kind}:${o.code}`) ?? 0) + 1);

      // Everything answered must arrive (the writer replays the spool once PostgreSQL is back).
      const mustHave = outcomes.filter((o) => o.kind === 'ok' || o.kind === 'error');
      let got = await rowsByMarker(instance);
      await waitFor(
        'every answered request in the query log',
        async () => {
          await gw.audit.flush();
          got = await rowsByMarker(instance);
          return mustHave.every((o) => got.byMarker.has(o.marker)) && gw.audit.stats().database!.spoolFiles === 0 && gw.audit.stats().database!.queued === 0;
        },
        30_000,
      ).catch((err: Error) => {
        const missing = mustHave.filter((o) => !got.byMarker.has(o.marker));
        const diag = { missing: missing.length, missingSamples: missing.slice(0, 5), rows: got.total, stats: gw.audit.stats().database, codes: Object.fromEntries(errorCodes) };
        throw new Error(`${err.message}: ${JSON.stringify(diag)}`);
      });
      const stats = gw.audit.stats().database!;
      const show = await showAudit(stack.port);
      const fatal = byKind('fatal');
      const none = byKind('none');
      const fatalRecorded = fatal.filter((o) => got.byMarker.has(o.marker));
      const noneRecorded = none.filter((o) => got.byMarker.has(o.marker));
      const report = {
        requests: total,
        ok: byKind('ok').length,
        error: byKind('error').length,
        fatal: fatal.length,
        fatalRecorded: fatalRecorded.length,
        none: none.length,
        noneRecorded: noneRecorded.length,
        codes: Object.fromEntries(errorCodes),
        answeredBeforeStop: answeredBefore,
        psqlRuns,
        timeline: { stopMs: stopAt - began, stopTookMs: stoppedAt - stopAt, startMs: startAt - began, startTookMs: upAt - startAt, flowsEndMs: flowEnd - began },
        rows: got.total,
        distinctLogIds: got.distinctIds,
        markers: got.byMarker.size,
        unmarked: got.unmarked,
        stats: { written: stats.written, spooled: stats.spooled, replayed: stats.replayed, duplicates: stats.duplicates, failures: stats.failures, dropped: stats.dropped, queued: stats.queued, spoolFiles: stats.spoolFiles },
        fatalSamples: fatal.slice(0, 5).map((o) => `${o.via} ${o.code} ${o.message}`),
        noneSamples: none.slice(0, 5).map((o) => `${o.via} ${o.marker} ${o.message} → row ${JSON.stringify(got.byMarker.get(o.marker) ?? null)}`),
      };
      console.log(`# audit durability, PostgreSQL ${how}: ${JSON.stringify(report)}`);

      assert.equal(total, CLIENTS * QUOTA + QUOTA + 2 * SLOW, 'every request was tried');
      assert.ok(byKind('ok').length > 0);
      assert.ok(outcomes.some((o) => o.kind !== 'ok'), 'some requests failed during the outage');
      // No loss: every request answered with a result or an error has its row, with that outcome.
      for (const o of mustHave) {
        const r = got.byMarker.get(o.marker);
        assert.ok(r, `no query_log row for ${o.marker} (${o.via}, ${o.kind} ${o.code ?? ''})`);
        assert.equal(r.n, 1, `${o.marker}: ${r.n} rows`);
        if (o.kind === 'ok') assert.deepEqual([r.results[0], r.sqlstates[0]], ['ok', null], o.marker);
        // 57014 (a pool wait that timed out before any server connection failed) is 'canceled'.
        else assert.deepEqual([r.results[0], r.sqlstates[0]], [o.code === '57014' ? 'canceled' : 'error', o.code], `${o.marker}: ${o.message}`);
      }
      // No duplicates: at most one row per marker, one per log id; every row is a request sent.
      for (const r of got.byMarker.values()) assert.equal(r.n, 1, `${r.marker} has ${r.n} rows`);
      assert.equal(got.total, got.distinctIds, 'no log id stored twice');
      const sent = new Set(outcomes.map((o) => o.marker));
      for (const m of got.byMarker.keys()) assert.ok(sent.has(m), `row for a request never made: ${m}`);
      // A request answered with a FATAL (the server went away mid-request) has a row too, with
      // that SQLSTATE; a request that got no answer at all may or may not have one (trustgate
      // records the requests still open when a session ends, as 08006 unless an error was seen).
      // (The exact SQLSTATE of a FATAL trustgate makes itself is checked in a test below.)
      for (const o of fatal) {
        const r = got.byMarker.get(o.marker);
        assert.ok(r, `no query_log row for ${o.marker}, answered with FATAL ${o.code} (${o.via}): ${o.message}`);
        assert.equal(r.n, 1, o.marker);
        assert.equal(r.results[0], 'error', o.marker);
        if (o.message === GATEWAY_FATAL) assert.ok(r.sqlstates[0] === o.code || r.sqlstates[0] === '08006', `${o.marker}: ${r.sqlstates[0]}`);
        else assert.equal(r.sqlstates[0], o.code, `${o.marker}: PostgreSQL's own FATAL, passed on`);
      }
      // The spool was really used, and is empty again.
      assert.ok(stats.spooled > 0, `records went through the spool: ${JSON.stringify(report.stats)}`);
      assert.ok(stats.failures > 0);
      assert.equal(stats.replayed, stats.spooled);
      assert.equal(stats.dropped, 0);
      assert.equal(stats.queued, 0);
      assert.equal(stats.spoolFiles, 0);
      assert.equal(num(show.queued), 0);
      assert.equal(num(show.spooled), stats.spooled);
      assert.equal(num(show.dropped), 0);
      assert.ok(num(show.failures) > 0);
      assert.equal(show.db_state, 'up');
      return { fatal, rows: got.byMarker };
    } finally {
      await stack.stop();
    }
  }

  /** Requests answered with a FATAL in the two runs above, with their rows. */
  const fatals: (Outcome & { row: Row | undefined })[] = [];
  it('PostgreSQL stopped while requests flow: every answered request is in the query log exactly once', async () => {
    const r = await outage('stop');
    fatals.push(...r.fatal.map((o) => ({ ...o, row: r.rows.get(o.marker) })));
  });

  it('PostgreSQL crashes (SIGKILL) while requests flow: every answered request is in the query log exactly once', async () => {
    const r = await outage('kill');
    fatals.push(...r.fatal.map((o) => ({ ...o, row: r.rows.get(o.marker) })));
  });

  it(
    "a FATAL trustgate sends itself (server connection lost) is recorded with that FATAL's SQLSTATE",
    () => {
      const made = fatals.filter((o) => o.message === GATEWAY_FATAL);
      assert.ok(made.length > 0, 'some request was answered by a FATAL of trustgate');
      for (const o of made) assert.equal(o.row?.sqlstates[0], o.code, `${o.marker} (${o.via})`);
    },
  );

  it('trustgate killed: a new process replays the spool exactly once; the crash bound', async () => {
    const instance = 'durability-kill';
    const spoolDir = path.join(tmp, 'spool-kill');
    const FLUSH_MS = 100;
    // The audit database exists (schema installed) but the auth role may not connect to it yet.
    await db.query('CREATE DATABASE auditdb');
    await installAuthFunction(
      {
        endpoint: { host: db.host, port: db.port, tls: { mode: 'disable' }, connectTimeoutMs: 5000 },
        database: 'auditdb',
        superuser: db.superuser,
        superuserPassword: db.superuserPassword,
        authRole: AUTH_ROLE,
        authRolePassword: AUTH_PASSWORD,
      },
      createLogger('silent'),
    );
    await db.query('REVOKE CONNECT ON DATABASE auditdb FROM PUBLIC');
    const auditRows = async () => {
      const r = await db.query<{ marker: string | null; n: string }>(
        `SELECT substring(statement_text from '${MARKER_RE}') AS marker, count(*) AS n FROM trustgate.query_log WHERE instance = $1 GROUP BY 1`,
        [instance],
        { database: 'auditdb' },
      );
      const [t] = await db.query<{ total: string; ids: string }>('SELECT count(*) AS total, count(DISTINCT log_id) AS ids FROM trustgate.query_log WHERE instance = $1', [instance], { database: 'auditdb' });
      return { byMarker: new Map(r.filter((x) => x.marker).map((x) => [x.marker!, Number(x.n)])), total: Number(t!.total), distinctIds: Number(t!.ids) };
    };

    const port = await findFreePort();
    const file = path.join(tmp, 'trustgate-kill.yaml');
    fs.writeFileSync(
      file,
      stringify({
        listen: { host: '127.0.0.1', port },
        server: { host: db.host, port: db.port, tls: { mode: 'disable' } },
        auth: { user: AUTH_ROLE, password_env: AUTH_ENV, database: 'postgres' },
        pool: { mode: 'transaction', default_size: 4 },
        admin_users: ['app'],
        log: { level: 'info' },
        audit: { enabled: true, instance, database_name: 'auditdb', spool_dir: spoolDir, flush_interval_ms: FLUSH_MS, spool_after_ms: 500 },
      }),
    );
    const children: ChildProcess[] = [];
    const startProcess = async (): Promise<{ child: ChildProcess; output: () => string }> => {
      const child = spawn(process.execPath, ['--import', 'tsx', path.resolve('src/cli/main.ts'), 'start', '--config', file], {
        env: { ...process.env, [AUTH_ENV]: AUTH_PASSWORD },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.push(child);
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      child.stderr!.on('data', (d) => (out += d));
      await waitFor('trustgate listening', async () => out.includes('trustgate listening') || child.exitCode !== null, 30_000);
      assert.match(out, /trustgate listening/);
      return { child, output: () => out };
    };
    const connect = async () => {
      const c = new pg.Client({ host: '127.0.0.1', port, user: 'app', password: USERS.app, database: 'postgres' });
      c.on('error', () => undefined);
      await c.connect();
      return c;
    };

    try {
      // First process: N requests, all answered; their records go to the spool.
      const first = await startProcess();
      const N = 300;
      const clients = await Promise.all([0, 1, 2].map(() => connect()));
      const phaseA: string[] = [];
      await Promise.all(
        clients.map(async (c, k) => {
          for (let i = k; i < N; i += clients.length) {
            const marker = `mk_a_${i}`;
            await c.query(i % 2 ? `SELECT $1::int AS ${marker}` : `SELECT ${i} AS ${marker}`, i % 2 ? [i] : undefined);
            phaseA.push(marker);
          }
        }),
      );
      assert.equal(phaseA.length, N);
      let show: Record<string, unknown> = {};
      await waitFor(
        'the N records spooled (SHOW AUDIT)',
        async () => {
          show = await showAudit(port);
          return num(show.spooled) >= N && num(show.queued) === 0;
        },
        15_000,
      );
      assert.equal(num(show.written), 0, 'nothing reached the database');
      assert.equal(show.db_state, 'down');
      assert.ok(num(show.failures) > 0);
      const spoolFile = path.join(spoolDir, `${instance}.jsonl`);
      const spooledLines = fs.readFileSync(spoolFile, 'utf8').split('\n').filter((l) => l.includes('"log":"query"'));
      // SHOW AUDIT's own request is recorded too: at least N lines, all of phase A among them.
      for (const m of phaseA) assert.ok(spooledLines.some((l) => l.includes(m)), `${m} in the spool file`);
      const spooledBeforeBurst = num(show.spooled);

      // The crash bound: a burst of sequential requests for 1.5 s, then SIGKILL at once.
      const burst: { marker: string; answeredAt: number }[] = [];
      const b = clients[0]!;
      const burstEnd = Date.now() + 1500;
      for (let i = 0; Date.now() < burstEnd; i++) {
        const marker = `mk_b_${i}`;
        await b.query(`SELECT ${i} AS ${marker}`);
        burst.push({ marker, answeredAt: Date.now() });
      }
      first.child.kill('SIGKILL');
      const killedAt = Date.now();
      await once(first.child, 'exit');
      for (const c of clients) void c.end().catch(() => undefined);
      assert.equal((await auditRows()).total, 0, 'nothing in the database before the restart');
      // Whole lines only (a line cut short by the kill would be skipped by the replay).
      const spoolAfterKill = fs
        .readFileSync(spoolFile, 'utf8')
        .split('\n')
        .filter((l) => {
          try {
            JSON.parse(l);
            return true;
          } catch {
            return false;
          }
        }).length;

      // The audit database becomes usable; a new process with the same spool dir and instance.
      await db.query(`GRANT CONNECT ON DATABASE auditdb TO ${AUTH_ROLE}`);
      const second = await startProcess();
      let got = await auditRows();
      await waitFor(
        'the spool replayed by the new process',
        async () => {
          got = await auditRows();
          show = await showAudit(port);
          return phaseA.every((m) => got.byMarker.has(m)) && num(show.spool_files) === 0 && num(show.queued) === 0;
        },
        20_000,
      );
      got = await auditRows();
      const burstArrived = burst.filter((x) => got.byMarker.has(x.marker));
      const burstLost = burst.filter((x) => !got.byMarker.has(x.marker));
      const oldestLost = burstLost.length ? Math.min(...burstLost.map((x) => x.answeredAt)) : null;
      const report = {
        phaseA: N,
        spooledBeforeBurst,
        spoolLinesAtKill: spoolAfterKill,
        burst: burst.length,
        burstArrived: burstArrived.length,
        burstLost: burstLost.length,
        lostAnsweredMsBeforeKill: oldestLost === null ? null : killedAt - oldestLost,
        rows: got.total,
        distinctLogIds: got.distinctIds,
        secondProcess: { written: num(show.written), replayed: num(show.replayed), duplicates: num(show.duplicates), spooled: num(show.spooled), failures: num(show.failures) },
      };
      console.log(`# audit durability, trustgate killed: ${JSON.stringify(report)}`);

      // Every phase A record exactly once; nothing doubled anywhere.
      for (const m of phaseA) assert.equal(got.byMarker.get(m), 1, `${m} stored once`);
      for (const [m, n] of got.byMarker) assert.equal(n, 1, `${m}: ${n} rows`);
      assert.equal(got.total, got.distinctIds);
      assert.ok(num(show.replayed) >= N, `the new process replayed the spool: ${JSON.stringify(report.secondProcess)}`);
      assert.equal(num(show.replayed), spoolAfterKill, 'the new process replayed exactly the whole lines of the spool');
      assert.equal(num(show.duplicates), 0);
      // Crash bound: what was lost was answered within the last flush interval (plus the time an
      // fsync'd append takes, with room for a loaded machine); older requests' records were in
      // the spool. What did arrive of the burst is a prefix: records are spooled in order.
      if (oldestLost !== null) assert.ok(killedAt - oldestLost <= FLUSH_MS + 500, `a record answered ${killedAt - oldestLost} ms before the kill was lost`);
      assert.deepEqual(burstArrived, burst.slice(0, burstArrived.length), 'the records that arrived are the oldest of the burst');
      // The new process writes to the database directly.
      const after = await connect();
      await after.query('SELECT 1 AS mk_c_0');
      await after.end();
      await waitFor('a live record of the new process', async () => (await auditRows()).byMarker.has('mk_c_0'), 10_000);
      second.child.kill('SIGTERM');
      await once(second.child, 'exit');
    } finally {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    }
  });
});
