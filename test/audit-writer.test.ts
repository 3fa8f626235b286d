/**
 * The audit logs on a real PostgreSQL: the schema installed by `trustgate init`, the writer's
 * batches (all fields, exactly once), privileges, retention, query band values, the spool across a
 * PostgreSQL restart and across a kill of the writing process, the overflow policy, synchronous
 * audit, JSON lines, and the creators of objects (event trigger) with and without a proxy.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { Writable } from 'node:stream';
import pgLib from 'pg';
import { AUTH_PASSWORD, AUTH_ROLE, installTrustgate, preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import { findFreePort, type EmbeddedPostgres } from './helpers/postgres.js';
import { setupTrustWorld, STORY_GRANTS, TRUST_USERS } from './helpers/trust.js';
import { AuditLog } from '../src/audit/audit-log.js';
import type { AuditSettings } from '../src/audit/settings.js';
import { INSERT_BATCH_SQL } from '../src/audit/audit-sql.js';
import { ACCESS_LOG_COLUMNS, QUERY_LOG_COLUMNS, type QueryLogInput } from '../src/audit/records.js';
import { createLogger } from '../src/log/logger.js';

let db: EmbeddedPostgres;
let tmp: string;
let instances = 0;

before(async () => {
  db = await preparePostgres();
  await setupTrustWorld(db);
  await db.query(`
    CREATE ROLE aud LOGIN PASSWORD 'aud-pw' IN ROLE trustgate_auditor;
    GRANT web_writer TO secadm WITH ADMIN OPTION;
    GRANT CREATE ON SCHEMA public TO web_writer, app_tier;
  `);
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-audit-test-'));
});
after(async () => {
  await db?.stop();
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

/** A logger whose lines the test can read. */
function capture(level = 'info'): { log: ReturnType<typeof createLogger>; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _e, cb) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { log: createLogger(level, sink), lines };
}

function settings(over: Partial<AuditSettings> = {}, port = db.port): AuditSettings {
  const instance = `test-${process.pid}-${++instances}`;
  return {
    enabled: true,
    instance,
    database: {
      endpoint: { host: db.host, port, tls: { mode: 'disable' }, connectTimeoutMs: 2000 },
      name: 'postgres',
      credentials: { user: AUTH_ROLE, password: AUTH_PASSWORD },
    },
    spoolDir: path.join(tmp, instance),
    policy: { mode: 'full', truncateAt: 4096, logParameters: false },
    flushIntervalMs: 20,
    batchSize: 100,
    spoolAfterMs: 2000,
    maxQueueRecords: 100_000,
    onOverflow: 'refuse',
    synchronous: false,
    jsonLines: null,
    ...over,
  };
}

const as = (user: string, password: string) => ({ user, password });

async function rejectsCode(p: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  await assert.rejects(p, (err: Error & { code?: string }) => {
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

async function waitFor(what: string, fn: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function idsIn(instance: string): Promise<{ count: number; distinct: number; ids: Set<number> }> {
  const rows = await db.query<{ log_id: string }>(
    'SELECT log_id FROM trustgate.query_log WHERE instance = $1 UNION ALL SELECT log_id FROM trustgate.access_log WHERE instance = $1',
    [instance],
  );
  const ids = new Set(rows.map((r) => Number(r.log_id)));
  return { count: rows.length, distinct: ids.size, ids };
}

const queryInput = (i: number, over: Partial<QueryLogInput> = {}): QueryLogInput => {
  const now = Date.now();
  return { trustedUser: 'app_tier', proxyUser: 'alice', statementText: `SELECT ${i}`, statementKind: 'SELECT', startedAt: now, endedAt: now + 1, result: 'ok', rows: 1, ...over };
};

describe('audit schema (trustgate init)', () => {
  it('is idempotent: a second init keeps the rows', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings();
    audit.configure(s);
    audit.query(queryInput(1));
    await audit.flush();
    await audit.close();
    await installTrustgate(db);
    assert.equal((await idsIn(s.instance)).count, 1);
  });
});

describe('audit writer', () => {
  it('writes records in batches, with every field', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings({ policy: { mode: 'truncate', truncateAt: 10, logParameters: true } });
    audit.configure(s);
    const started = Date.parse('2026-03-01T10:00:00.123Z') + 0.456;
    const full: QueryLogInput = {
      clientAddr: '10.1.2.3:40000',
      clientSession: 'c42',
      database: 'shop',
      trustedUser: 'app_tier',
      proxyUser: 'bob_from_web',
      proxyRole: 'web_reader',
      proxyKind: 'application',
      queryBand: 'ProxyUser=bob_from_web;ProxyRole=web_reader;order=42;',
      transactionBand: 'order=42;',
      sessionBand: 'ProxyUser=bob_from_web;ProxyRole=web_reader;',
      statementText: 'SELECT * FROM shop.orders WHERE id = $1',
      statementKind: 'SELECT',
      startedAt: started,
      endedAt: started + 2.5,
      rows: 3,
      sqlstate: null,
      result: 'ok',
      bytesIn: 120,
      bytesOut: 4096,
      poolMode: 'transaction',
      trustedRequest: true,
      params: ['42', null],
    };
    const ids: number[] = [audit.query(full)];
    for (let i = 0; i < 249; i++) ids.push(audit.query(queryInput(i)));
    for (let i = 0; i < 50; i++) {
      ids.push(
        audit.access({
          at: started,
          clientAddr: '10.1.2.3:40000',
          clientSession: 'c42',
          database: 'shop',
          trustedUser: 'app_tier',
          proxyUser: 'dave',
          proxyRole: null,
          queryBand: 'ProxyUser=dave;',
          event: 'proxy_refused',
          decision: 'refused',
          rule: null,
          sqlstate: '42501',
          message: 'trusted user "app_tier" has no CONNECT THROUGH rule for proxy user "dave"',
          detail: null,
          statementText: "SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION",
        }),
      );
    }
    assert.equal(new Set(ids).size, 300);
    await audit.flush();
    const stats = audit.stats().database!;
    assert.equal(stats.written, 300);
    assert.equal(stats.spooled, 0);
    assert.equal(stats.queued, 0);
    await audit.close();

    const q = await db.query('SELECT *, (extract(epoch FROM started_at) * 1000000)::bigint::text AS started_us FROM trustgate.query_log WHERE instance = $1 AND log_id = $2', [s.instance, ids[0]]);
    assert.equal(q.length, 1);
    const row = q[0];
    assert.equal(row.client_addr, '10.1.2.3:40000');
    assert.equal(row.client_session, 'c42');
    assert.equal(row.database, 'shop');
    assert.equal(row.trusted_user, 'app_tier');
    assert.equal(row.proxy_user, 'bob_from_web');
    assert.equal(row.proxy_role, 'web_reader');
    assert.equal(row.proxy_kind, 'application');
    assert.equal(row.query_band, full.queryBand);
    assert.equal(row.transaction_band, 'order=42;');
    assert.equal(row.session_band, full.sessionBand);
    assert.equal(row.statement_text, 'SELECT * F'); // statement_text: truncate, truncate_at: 10
    assert.match(row.statement_fingerprint, /^[0-9a-f]{16}$/);
    assert.equal(row.statement_kind, 'SELECT');
    assert.equal(row.started_us, '1772359200123456'); // microseconds kept
    assert.equal(row.duration_ms, 2.5);
    assert.equal(row.rows, '3');
    assert.equal(row.sqlstate, null);
    assert.equal(row.result, 'ok');
    assert.equal(row.bytes_in, '120');
    assert.equal(row.bytes_out, '4096');
    assert.equal(row.pool_mode, 'transaction');
    assert.equal(row.trusted_request, true);
    assert.deepEqual(row.params, ['42', null]);
    const a = await db.query('SELECT * FROM trustgate.access_log WHERE instance = $1 ORDER BY log_id LIMIT 1', [s.instance]);
    assert.equal(a[0].event, 'proxy_refused');
    assert.equal(a[0].decision, 'refused');
    assert.equal(a[0].proxy_user, 'dave');
    assert.equal(a[0].sqlstate, '42501');
    assert.match(a[0].message, /no CONNECT THROUGH rule/);
    assert.equal(a[0].statement_text, 'SET QUERY_');
    // Batches: rows inserted by one statement share a transaction id.
    const tx = await db.query<{ n: string }>('SELECT count(DISTINCT xmin::text) AS n FROM (SELECT xmin FROM trustgate.query_log WHERE instance = $1 UNION ALL SELECT xmin FROM trustgate.access_log WHERE instance = $1) x', [s.instance]);
    assert.ok(Number(tx[0].n) <= 10, `300 records in ${tx[0].n} transactions`);
    assert.ok(Number(tx[0].n) >= 3, 'batch_size 100 → at least 3 batches');
  });

  it('without flush(): a full batch goes at once, the remainder within flush_interval_ms', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings({ flushIntervalMs: 50, batchSize: 100 });
    audit.configure(s);
    await waitFor('the writer connection', async () => audit.stats().database!.database === 'up', 10_000);
    for (let i = 0; i < 150; i++) audit.query(queryInput(i));
    await waitFor('all 150 records', async () => (await idsIn(s.instance)).count === 150, 5_000);
    await audit.close();
  });

  it('ON CONFLICT: the same batch sent twice is stored once', async () => {
    const row = (id: number) => ({ log: 'query', log_id: id, instance: 'dup-test', started_at: '2026-01-01T00:00:00Z', ended_at: '2026-01-01T00:00:01Z', result: 'ok', trusted_request: false });
    const batch = JSON.stringify([row(1), row(2), row(3)]);
    const auth = as(AUTH_ROLE, AUTH_PASSWORD);
    const first = await db.query(INSERT_BATCH_SQL, [batch, '[]'], auth);
    const again = await db.query(INSERT_BATCH_SQL, [batch, '[]'], auth);
    assert.deepEqual(Object.values(first[0]).map(Number), [3, 0]);
    assert.deepEqual(Object.values(again[0]).map(Number), [0, 0]);
    assert.equal((await idsIn('dup-test')).count, 3);
  });

  it('synchronous: queryAndWait resolves once the row is committed', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings({ flushIntervalMs: 60_000, synchronous: true });
    audit.configure(s);
    assert.equal(audit.synchronous, true);
    // Wait for the connection (otherwise the record is fsync'd to the spool, also "safe").
    await waitFor('the writer connection', async () => audit.stats().database!.database === 'up', 10_000);
    const id = await audit.queryAndWait(queryInput(1));
    assert.ok((await idsIn(s.instance)).ids.has(id), 'committed before the promise resolved');
    await audit.close();
  });

  it('reload: a changed writer setting starts a new writer; records of both arrive once', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings();
    audit.configure(s);
    const ids = [audit.query(queryInput(1)), audit.query(queryInput(2))];
    audit.configure({ ...s, batchSize: 7, policy: { mode: 'none', truncateAt: 1, logParameters: false } });
    ids.push(audit.query(queryInput(3)));
    await audit.flush();
    await audit.close();
    const got = await idsIn(s.instance);
    assert.equal(got.count, 3);
    assert.deepEqual([...got.ids].sort(), [...ids].sort());
    const texts = await db.query('SELECT statement_text FROM trustgate.query_log WHERE instance = $1 AND log_id = $2', [s.instance, ids[2]]);
    assert.equal(texts[0].statement_text, null, 'the new statement policy applies');
  });

  it('query band values per row, and one query answers who did what, as whom, and what was refused', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings();
    audit.configure(s);
    const t = Date.now() - 3_600_000;
    audit.query(queryInput(1, { queryBand: 'ProxyUser=alice;Order=42;', startedAt: t, endedAt: t + 1, clientSession: 'band-test' }));
    audit.query(queryInput(2, { queryBand: 'ProxyUser=alice;', startedAt: t + 5, endedAt: t + 6, sqlstate: '42501', result: 'error', statementText: 'SELECT * FROM shop.audit_notes', clientSession: 'band-test' }));
    audit.access({ at: t + 10, trustedUser: 'app_tier', proxyUser: 'alice', event: 'tamper_refused', decision: 'refused', sqlstate: '42501', message: 'SET ROLE is not allowed', statementText: 'SET ROLE postgres', clientSession: 'band-test' });
    await audit.flush();
    await audit.close();
    const bands = await db.query(
      "SELECT trustgate.query_band_value(query_band, 'order') AS v FROM trustgate.query_log_v WHERE instance = $1 ORDER BY log_id",
      [s.instance],
    );
    assert.deepEqual(
      bands.map((r) => r.v),
      ['42', null],
    );
    const trail = await db.query(
      `SELECT log, trusted_user AS middle_tier, proxy_role, action, outcome, refused, statement_text
       FROM trustgate.audit_trail
       WHERE end_user = 'alice' AND instance = $1 AND at >= now() - interval '1 day'
       ORDER BY at`,
      [s.instance],
    );
    assert.deepEqual(
      trail.map((r) => [r.log, r.middle_tier, r.action, r.outcome, r.refused]),
      [
        ['query', 'app_tier', 'SELECT', 'ok', false],
        ['query', 'app_tier', 'SELECT', 'error', true],
        ['access', 'app_tier', 'tamper_refused', 'refused', true],
      ],
    );
  });

  it('retention: purge_audit deletes only rows older than the interval, for trustgate_admin only', async () => {
    const audit = new AuditLog(createLogger('silent'));
    const s = settings();
    audit.configure(s);
    const old = Date.now() - 10 * 86_400_000;
    for (let i = 0; i < 5; i++) audit.query(queryInput(i, { startedAt: old, endedAt: old + 1 }));
    for (let i = 0; i < 3; i++) audit.access({ at: old, event: 'proxy_granted', decision: 'granted', trustedUser: 'app_tier', proxyUser: 'alice' });
    const keep = [audit.query(queryInput(9)), audit.access({ event: 'proxy_granted', decision: 'granted' })];
    await audit.flush();
    await audit.close();
    await rejectsCode(db.query("SELECT * FROM trustgate.purge_audit('7 days')", [], as('app', 'app-pw')), '42501');
    await rejectsCode(db.query("SELECT * FROM trustgate.purge_audit('-1 day')", [], as('secadm', TRUST_USERS.secadm)), '22023');
    const before = await db.query("SELECT count(*)::int AS n FROM trustgate.query_log WHERE started_at >= now() - interval '7 days'");
    const purged = await db.query("SELECT * FROM trustgate.purge_audit('7 days')", [], as('secadm', TRUST_USERS.secadm));
    assert.ok(Number(purged[0].query_log_deleted) >= 5);
    assert.ok(Number(purged[0].access_log_deleted) >= 3);
    const left = await idsIn(s.instance);
    assert.deepEqual([...left.ids].sort(), [...keep].sort());
    const after = await db.query("SELECT count(*)::int AS n FROM trustgate.query_log WHERE started_at >= now() - interval '7 days'");
    assert.equal(after[0].n, before[0].n, 'recent rows are all kept');
    // Only through the function: even the table owner cannot delete directly.
    await rejectsCode(db.query('DELETE FROM trustgate.query_log'), '42501', /audit records/);
  });
});

describe('audit privileges', () => {
  const row = JSON.stringify({ log_id: 1, instance: 'forged', started_at: 'now', ended_at: 'now', result: 'ok', trusted_request: false, trusted_user: 'alice' });

  it('a normal user can neither read nor write nor forge any audit row', async () => {
    const app = as('app', 'app-pw');
    for (const sql of [
      'SELECT * FROM trustgate.query_log',
      'SELECT * FROM trustgate.access_log',
      'SELECT * FROM trustgate.object_creator',
      'SELECT * FROM trustgate.audit_trail',
      'SELECT * FROM trustgate.object_creators',
      `INSERT INTO trustgate.query_log SELECT * FROM json_populate_record(NULL::trustgate.query_log, '${row}')`,
      "INSERT INTO trustgate.access_log (log_id, instance, at, event, decision) VALUES (1, 'forged', now(), 'proxy_granted', 'granted')",
      "INSERT INTO trustgate.object_creator (classid, objid, object_identity, object_type, command_tag, creator, creator_source, session_user_name, current_role_name, identity_status) VALUES (1259, 1, 'x', 'table', 'CREATE TABLE', 'alice', 'session_user', 'alice', 'alice', 'none')",
      "UPDATE trustgate.query_log SET proxy_user = 'nobody'",
      'DELETE FROM trustgate.access_log',
      'TRUNCATE trustgate.object_creator',
      "SELECT trustgate.audit_high_water('x')",
    ]) {
      await rejectsCode(db.query(sql, [], app), '42501', undefined);
    }
  });

  it('the auth role may only insert; it cannot read, change or delete', async () => {
    const auth = as(AUTH_ROLE, AUTH_PASSWORD);
    await db.query(INSERT_BATCH_SQL, [`[${row}]`, '[]'], auth);
    for (const sql of ['SELECT * FROM trustgate.query_log', "UPDATE trustgate.query_log SET proxy_user = 'x'", 'DELETE FROM trustgate.query_log', 'SELECT * FROM trustgate.object_creator']) {
      await rejectsCode(db.query(sql, [], auth), '42501');
    }
  });

  it('auditors read the logs, the views and the creators, and write nothing', async () => {
    const aud = as('aud', 'aud-pw');
    for (const v of ['query_log', 'access_log', 'query_log_v', 'access_log_v', 'audit_trail', 'object_creator', 'object_creators']) {
      await db.query(`SELECT * FROM trustgate.${v} LIMIT 1`, [], aud);
    }
    await rejectsCode(db.query("INSERT INTO trustgate.access_log (log_id, instance, at, event, decision) VALUES (2, 'forged', now(), 'x', 'granted')", [], aud), '42501');
    await rejectsCode(db.query("SELECT * FROM trustgate.purge_audit('1 day')", [], aud), '42501');
  });

  it('even the owner cannot change a row (the guard trigger)', async () => {
    await rejectsCode(db.query("UPDATE trustgate.query_log SET proxy_user = 'x' WHERE instance = 'forged'"), '42501', /audit records/);
  });
});

describe('exactly once across a PostgreSQL restart', () => {
  it('every record of a continuous flow arrives once, none lost, none doubled', async () => {
    const { log } = capture('silent');
    const audit = new AuditLog(log);
    const s = settings({ flushIntervalMs: 10, batchSize: 50, spoolAfterMs: 500 });
    audit.configure(s);
    await waitFor('the writer connection', async () => audit.stats().database!.database === 'up', 10_000);
    const ids: number[] = [];
    let restart: Promise<void> | null = null;
    const N = 3000;
    for (let i = 0; i < N; i++) {
      ids.push(i % 10 === 9 ? audit.access({ event: 'server_refused', decision: 'refused', sqlstate: '42501', detail: `n=${i}` }) : audit.query(queryInput(i)));
      if (i % 10 === 9) await new Promise((r) => setTimeout(r, 10));
      if (i === 600) restart = db.restart();
    }
    await restart;
    await waitFor('every record in the database', async () => {
      await audit.flush();
      return (await idsIn(s.instance)).count >= N;
    });
    const stats = audit.stats().database!;
    await audit.close();
    const got = await idsIn(s.instance);
    assert.equal(got.count, N, 'no record doubled');
    assert.equal(got.distinct, N);
    assert.deepEqual([...got.ids].sort((a, b) => a - b), [...ids].sort((a, b) => a - b), 'exactly the records recorded');
    assert.ok(stats.spooled > 0, `records went through the spool while PostgreSQL was down: ${JSON.stringify(stats)}`);
    assert.equal(stats.replayed, stats.spooled);
    assert.equal(stats.dropped, 0);
    assert.equal(stats.spoolFiles, 0);
  });
});

describe('kill and replay', () => {
  it('records spooled by a killed process reach the database once, via the next process', async () => {
    const deadPort = await findFreePort();
    const s = settings({}, deadPort);
    const N = 500;
    const child = spawn(process.execPath, ['--import', 'tsx', path.join(import.meta.dirname, 'helpers', 'audit-child.ts'), JSON.stringify(s), String(N)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (c: string) => (out += c));
    await waitFor('the child to spool its records', async () => out.includes('\n'), 30_000);
    const reported = JSON.parse(out.trim()) as { ids: number[]; stats: { database: { spooled: number; written: number } } };
    assert.equal(reported.stats.database.spooled, N);
    assert.equal(reported.stats.database.written, 0);
    child.kill('SIGKILL');
    await once(child, 'exit');
    // The crash also left half a line behind (a write cut short): ignored with a warning.
    fs.appendFileSync(path.join(s.spoolDir, `${s.instance.replace(/[^A-Za-z0-9._-]/g, '_')}.jsonl`), '{"log":"query","log_id":12');
    assert.equal((await idsIn(s.instance)).count, 0);

    const { log, lines } = capture();
    const audit = new AuditLog(log);
    audit.configure({ ...s, database: { ...s.database!, endpoint: { ...s.database!.endpoint, port: db.port } } });
    const after = audit.query(queryInput(N)); // the new process records too; its id is above the old ones
    assert.ok(after > Math.max(...reported.ids));
    await waitFor('the replay', async () => {
      await audit.flush();
      return (await idsIn(s.instance)).count >= N + 1;
    });
    const stats = audit.stats().database!;
    await audit.close();
    const got = await idsIn(s.instance);
    assert.equal(got.count, N + 1);
    assert.equal(got.distinct, N + 1);
    for (const id of reported.ids) assert.ok(got.ids.has(id));
    assert.ok(stats.replayed >= N, 'the spooled records were replayed (and the new record too, if it was spooled behind them)');
    assert.ok(lines.some((l) => l.level === 40 && /unfinished last line|not valid records/.test(String(l.msg))), 'the cut line was skipped with a warning');
    assert.deepEqual(fs.readdirSync(s.spoolDir), [], 'the spool is empty after the replay');
  });
});

describe('overflow policy (database down, spool unwritable)', () => {
  const blocked = () => {
    const file = path.join(tmp, `not-a-dir-${++instances}`);
    fs.writeFileSync(file, 'x');
    return path.join(file, 'spool');
  };

  it('drop: records beyond max_queue_records are dropped, counted, with a loud error', async () => {
    const { log, lines } = capture();
    const audit = new AuditLog(log);
    audit.configure(settings({ spoolDir: blocked(), maxQueueRecords: 50, onOverflow: 'drop', batchSize: 10 }, await findFreePort()));
    let dropped = 0;
    audit.on('dropped', (n: number) => (dropped += n));
    for (let i = 0; i < 80; i++) audit.query(queryInput(i));
    await audit.flush();
    const stats = audit.stats();
    assert.equal(stats.database!.dropped, 30);
    assert.equal(dropped, 30);
    assert.equal(stats.database!.queued, 50);
    assert.equal(stats.accepting, true, 'drop never refuses');
    assert.ok(lines.some((l) => l.level === 50 && /audit records dropped/.test(String(l.msg))), 'log.error on drop');
    assert.ok(lines.some((l) => l.level === 50 && /spool/.test(String(l.msg))), 'log.error on the spool');
    await audit.close();
    assert.equal(audit.stats().database, null);
  });

  it('refuse: accepting turns false at max_queue_records (and nothing is dropped)', async () => {
    const { log, lines } = capture();
    const audit = new AuditLog(log);
    audit.configure(settings({ spoolDir: blocked(), maxQueueRecords: 50, onOverflow: 'refuse', batchSize: 10 }, await findFreePort()));
    const events: boolean[] = [];
    audit.on('accepting', (v: boolean) => events.push(v));
    for (let i = 0; i < 49; i++) audit.query(queryInput(i));
    assert.equal(audit.accepting, true);
    audit.query(queryInput(49));
    assert.equal(audit.accepting, false);
    assert.deepEqual(events, [false]);
    // Requests already running still get their records in (headroom).
    for (let i = 0; i < 20; i++) audit.query(queryInput(100 + i));
    await audit.flush();
    const stats = audit.stats();
    assert.equal(stats.database!.dropped, 0);
    assert.equal(stats.database!.queued, 70);
    assert.ok(lines.some((l) => l.level === 50 && /refusing new requests/.test(String(l.msg))));
    await audit.close();
  });
});

describe('JSON lines', () => {
  it('a file gets one JSON object per record, with the SQL column names plus "log"', async () => {
    const file = path.join(tmp, 'audit.jsonl');
    const audit = new AuditLog(createLogger('silent'));
    audit.configure(settings({ database: null, jsonLines: { path: file, maxBufferBytes: 1 << 20 }, policy: { mode: 'fingerprint', truncateAt: 10, logParameters: false } }));
    const ids = [audit.query(queryInput(1)), audit.access({ event: 'connect_through_grant', decision: 'granted', trustedUser: 'secadm', rule: { kind: 'permanent', proxyUser: 'alice' } }), audit.query(queryInput(2, { result: 'error', sqlstate: '42P01' }))];
    const waited = await audit.queryAndWait(queryInput(3));
    await audit.close();
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    assert.equal(lines.pop(), '');
    assert.equal(lines.length, 4);
    const objs = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.deepEqual(objs.map((o) => o.log_id), [...ids, waited]);
    assert.deepEqual(Object.keys(objs[0]), ['log', ...QUERY_LOG_COLUMNS.map((c) => c[1])]);
    assert.deepEqual(Object.keys(objs[1]), ['log', ...ACCESS_LOG_COLUMNS.map((c) => c[1])]);
    assert.equal(objs[1].log, 'access');
    assert.deepEqual(objs[1].rule, { kind: 'permanent', proxyUser: 'alice' });
    assert.equal(objs[0].statement_text, null, 'fingerprint policy: no text');
    assert.match(String(objs[0].statement_fingerprint), /^[0-9a-f]{16}$/);
  });

  it('additionally to the database: the same records in both', async () => {
    const file = path.join(tmp, 'both.jsonl');
    const audit = new AuditLog(createLogger('silent'));
    const s = settings({ jsonLines: { path: file, maxBufferBytes: 1 << 20 } });
    audit.configure(s);
    const ids = [audit.query(queryInput(1)), audit.access({ event: 'proxy_granted', decision: 'granted' })];
    await audit.flush();
    await audit.close();
    const fromFile = fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { log_id: number }).log_id);
    assert.deepEqual(fromFile, ids);
    assert.deepEqual([...(await idsIn(s.instance)).ids].sort(), [...ids].sort());
  });
});

describe('creators of objects (event trigger)', () => {
  const creator = async (identity: string) =>
    (await db.query('SELECT creator, creator_source, proxy_user, proxy_role, trusted_user, owner, identity_status, session_user_name, query_band FROM trustgate.object_creators WHERE object_identity = $1', [identity]))[0];

  it('without a proxy, the session user', async () => {
    await db.query('CREATE TABLE public.c_plain (x int)', [], as('app', 'app-pw'));
    const c = await creator('public.c_plain');
    assert.deepEqual(
      { creator: c.creator, source: c.creator_source, owner: c.owner, status: c.identity_status, proxy: c.proxy_user },
      { creator: 'app', source: 'session_user', owner: 'app', status: 'none', proxy: null },
    );
  });

  it('forged identity settings do not make a forged creator (the MAC is checked)', async () => {
    const client = new pgLib.Client(db.connectionConfig(as('app_tier', TRUST_USERS.app_tier)));
    await client.connect();
    try {
      const pid = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid as number;
      const token = JSON.stringify({ v: 1, pid, tu: 'app_tier', pu: 'alice', pr: null, k: 'permanent', role: 'app_tier', qb: 'ProxyUser=alice;', tb: null, sb: null });
      await client.query("SELECT set_config('trustgate.identity', $1, false), set_config('trustgate.identity_mac', $2, false)", [token, 'ab'.repeat(32)]);
      await client.query('CREATE TABLE public.c_forged (x int)'); // the CREATE itself is not refused
    } finally {
      await client.end();
    }
    const c = await creator('public.c_forged');
    assert.equal(c.creator, 'app_tier');
    assert.equal(c.creator_source, 'session_user');
    assert.equal(c.proxy_user, null);
    assert.equal(c.identity_status, 'invalid');
  });

  for (const mode of ['transaction', 'session'] as const) {
    describe(`through the gateway (${mode} mode)`, () => {
      let stack: Stack;
      before(async () => {
        const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 2 }, audit: { enabled: true, instance: `gw-${mode}`, spool_dir: path.join(tmp, `gw-${mode}`) } });
        stack = stackOf(db, gw, logs, false);
        if (mode === 'transaction') {
          const admin = new pgLib.Client(stack.clientConfig('secadm'));
          await admin.connect();
          for (const g of STORY_GRANTS) await admin.query(g);
          await admin.end();
        }
      });
      after(() => stack?.stop());

      it('a PERMANENT proxy user is the creator of what it creates', async () => {
        const app = new pgLib.Client(stack.clientConfig('app_tier'));
        await app.connect();
        try {
          await app.query('BEGIN');
          await app.query("SET QUERY_BAND = 'ProxyUser=alice;ticket=7;' FOR TRANSACTION");
          await app.query(`CREATE TABLE public.c_alice_${mode} (x int)`);
          await app.query('COMMIT');
        } finally {
          await app.end();
        }
        const c = await creator(`public.c_alice_${mode}`);
        assert.deepEqual(
          { creator: c.creator, source: c.creator_source, proxy: c.proxy_user, trusted: c.trusted_user, owner: c.owner, status: c.identity_status, session: c.session_user_name },
          { creator: 'alice', source: 'permanent_proxy', proxy: 'alice', trusted: 'app_tier', owner: 'alice', status: 'verified', session: 'app_tier' },
        );
        assert.equal(c.query_band, 'ProxyUser=alice;ticket=7;');
      });

      it('an application user: the trusted user is the creator', async () => {
        const app = new pgLib.Client(stack.clientConfig('app_tier'));
        await app.connect();
        try {
          await app.query("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_writer;' FOR SESSION");
          await app.query(`CREATE TABLE public.c_bob_${mode} (x int)`);
          await app.query('SET QUERY_BAND = NONE FOR SESSION');
        } finally {
          await app.end();
        }
        const c = await creator(`public.c_bob_${mode}`);
        assert.deepEqual(
          { creator: c.creator, source: c.creator_source, proxy: c.proxy_user, role: c.proxy_role, trusted: c.trusted_user, owner: c.owner, status: c.identity_status },
          { creator: 'app_tier', source: 'application_proxy', proxy: 'bob_from_web', role: 'web_writer', trusted: 'app_tier', owner: 'web_writer', status: 'verified' },
        );
      });

      it('SHOW AUDIT shows the writer', async () => {
        const admin = new pgLib.Client(stack.clientConfig('app', 'trustgate'));
        await admin.connect();
        try {
          const r = await admin.query('SHOW AUDIT');
          assert.equal(r.rows.length, 1);
          assert.equal(r.rows[0].instance, `gw-${mode}`);
          assert.equal(r.rows[0].enabled, 'true');
          assert.equal(r.rows[0].database, 'postgres');
          assert.equal(r.rows[0].dropped, '0');
        } finally {
          await admin.end();
        }
      });
    });
  }
});
