/**
 * Pure parts of the audit logs: the statement-text policy, row formatting (snake_case, times,
 * text PostgreSQL could not store), log ids, and the JSON line shared by all sinks.
 */
import { describe, it, before } from 'node:test';
import assert from 'node:assert/strict';
import {
  ACCESS_LOG_COLUMNS,
  EntryFormatter,
  QUERY_LOG_COLUMNS,
  accessLogRow,
  applyStatementPolicy,
  cleanText,
  isoMicros,
  queryLogRow,
  rowToRecord,
  statementFingerprint,
  truncateText,
  type QueryLogInput,
  type StatementPolicy,
} from '../../src/audit/records.js';
import { LogIdGenerator } from '../../src/audit/log-id.js';
import { loadSqlParser } from '../../src/sql/classify.js';
import { parseConfig } from '../../src/config/load.js';
import { defaultSpoolDir, resolveAuditSettings } from '../../src/audit/settings.js';
import os from 'node:os';

const policy = (mode: StatementPolicy['mode'], truncateAt = 10, logParameters = false): StatementPolicy => ({ mode, truncateAt, logParameters });

before(() => loadSqlParser());

describe('statement text policy', () => {
  const sql = 'SELECT * FROM shop.orders WHERE id = 42';

  it('full keeps the text and adds a fingerprint', () => {
    const r = applyStatementPolicy(sql, policy('full'));
    assert.equal(r.statementText, sql);
    assert.match(r.statementFingerprint!, /^[0-9a-f]{16}$/);
  });

  it('truncate keeps the first N characters', () => {
    assert.equal(applyStatementPolicy(sql, policy('truncate', 10)).statementText, 'SELECT * F');
    assert.equal(applyStatementPolicy('short', policy('truncate', 10)).statementText, 'short');
  });

  it('truncate never cuts a surrogate pair in half', () => {
    assert.equal(truncateText('ab😀cd', 3), 'ab');
    assert.equal(truncateText('ab😀cd', 4), 'ab😀');
  });

  it('fingerprint stores no text; constants and spacing do not change it', () => {
    const a = applyStatementPolicy(sql, policy('fingerprint'));
    const b = applyStatementPolicy('select *   from shop.orders where id = 7', policy('fingerprint'));
    assert.equal(a.statementText, null);
    assert.equal(a.statementFingerprint, b.statementFingerprint);
    assert.notEqual(a.statementFingerprint, applyStatementPolicy('SELECT * FROM shop.items WHERE id = 1', policy('fingerprint')).statementFingerprint);
  });

  it('text that does not parse gets sha256 of the whitespace-normalized text', () => {
    const fp = statementFingerprint('SELEC garbage   here');
    assert.match(fp, /^[0-9a-f]{64}$/);
    assert.equal(fp, statementFingerprint('  SELEC garbage here '));
  });

  it('none stores neither; no statement stores neither', () => {
    assert.deepEqual(applyStatementPolicy(sql, policy('none')), { statementText: null, statementFingerprint: null });
    assert.deepEqual(applyStatementPolicy(null, policy('full')), { statementText: null, statementFingerprint: null });
  });
});

describe('rows', () => {
  const input: QueryLogInput = {
    clientAddr: '10.0.0.1:5000',
    clientSession: 'c7',
    database: 'shop',
    trustedUser: 'app_tier',
    proxyUser: 'alice',
    proxyKind: 'permanent',
    queryBand: 'ProxyUser=alice;order=42;',
    transactionBand: 'ProxyUser=alice;order=42;',
    statementText: 'SELECT $1::int',
    statementKind: 'SELECT',
    startedAt: 1_700_000_000_000.25,
    endedAt: 1_700_000_000_003.75,
    rows: 1,
    result: 'ok',
    bytesIn: 40,
    bytesOut: 80,
    poolMode: 'transaction',
    trustedRequest: true,
    params: ['1'],
  };

  it('query rows have exactly the SQL columns, in snake_case', () => {
    const row = queryLogRow(5, 'gw1', input, policy('full'));
    assert.deepEqual(Object.keys(row), QUERY_LOG_COLUMNS.map((c) => c[1]));
    assert.equal(row.started_at, '2023-11-14T22:13:20.000250Z');
    assert.equal(row.ended_at, '2023-11-14T22:13:20.003750Z');
    assert.equal(row.duration_ms, 3.5);
    assert.equal(row.proxy_role, null);
    assert.equal(row.trusted_request, true);
  });

  it('parameters are stored only with log_parameters', () => {
    assert.equal(queryLogRow(1, 'i', input, policy('full')).params, null);
    assert.deepEqual(queryLogRow(1, 'i', input, policy('full', 10, true)).params, ['1']);
  });

  it('access rows have exactly the SQL columns; the rule is kept as JSON', () => {
    const row = accessLogRow(6, 'gw1', { event: 'proxy_refused', decision: 'refused', trustedUser: 'app_tier', proxyUser: 'dave', rule: { kind: 'permanent', roles: [] }, sqlstate: '42501' }, policy('none'), 0);
    assert.deepEqual(Object.keys(row), ACCESS_LOG_COLUMNS.map((c) => c[1]));
    assert.equal(row.at, '1970-01-01T00:00:00.000000Z');
    assert.deepEqual(row.rule, { kind: 'permanent', roles: [] });
  });

  it('camelCase records map back from rows', () => {
    const rec = rowToRecord('query', queryLogRow(9, 'gw1', input, policy('full')));
    assert.equal(rec.logId, 9);
    assert.equal(rec.proxyUser, 'alice');
    assert.equal(rec.statementKind, 'SELECT');
  });

  it('NUL and lone surrogates are replaced (PostgreSQL could not store them)', () => {
    assert.equal(cleanText('a\u0000b'), 'a\ufffdb');
    assert.equal(cleanText('x\ud800y'), 'x\ufffdy');
    assert.equal(cleanText('ok 😀'), 'ok 😀');
    assert.equal(queryLogRow(1, 'i', { ...input, statementText: 'SELECT \u0000' }, policy('full')).statement_text, 'SELECT \ufffd');
  });

  it('isoMicros keeps microseconds', () => {
    assert.equal(isoMicros(0.001), '1970-01-01T00:00:00.000001Z');
    assert.equal(isoMicros(1.9995), '1970-01-01T00:00:00.001999Z'); // rounding never spills into the next millisecond
  });

  it('the JSON line is made once and names the log', () => {
    const f = new EntryFormatter('gw1', policy('full'));
    const e = { log: 'query' as const, logId: 3, input, madeAt: 0 };
    const line = f.line(e);
    assert.equal(f.line(e), line);
    const parsed = JSON.parse(line) as Record<string, unknown>;
    assert.equal(parsed.log, 'query');
    assert.equal(parsed.log_id, 3);
    assert.equal(parsed.instance, 'gw1');
  });
});

describe('log ids', () => {
  it('are the microsecond clock, strictly increasing within a millisecond', () => {
    let now = 1_000;
    const ids = new LogIdGenerator(() => now);
    assert.equal(ids.next(), 1_000_000);
    assert.equal(ids.next(), 1_000_001);
    now = 1_001;
    assert.equal(ids.next(), 1_001_000);
  });

  it('never go back: a clock stepped back or a higher id seen elsewhere', () => {
    let now = 2_000;
    const ids = new LogIdGenerator(() => now);
    const a = ids.next();
    now = 1_000;
    assert.ok(ids.next() > a);
    ids.atLeast(5_000_000);
    assert.equal(ids.next(), 5_000_001);
  });

  it('a restarted generator starts above the previous one (the clock moved on)', () => {
    const first = new LogIdGenerator();
    let last = 0;
    for (let i = 0; i < 5000; i++) last = first.next();
    const second = new LogIdGenerator(() => Date.now() + 1);
    // 5000 ids borrow at most 5 ms from the future; a real restart takes far longer than that.
    second.atLeast(last);
    assert.ok(second.next() > last);
  });
});

describe('audit configuration', () => {
  it('is off by default, with the documented defaults', () => {
    const c = parseConfig({});
    assert.equal(c.audit.enabled, false);
    assert.equal(c.audit.statement_text, 'full');
    assert.equal(c.audit.log_parameters, false);
    assert.equal(c.audit.flush_interval_ms, 100);
    assert.equal(c.audit.on_overflow, 'refuse');
  });

  it('needs a destination: the database (through auth.user) or JSON lines', () => {
    assert.throws(() => parseConfig({ audit: { enabled: true } }), /audit\.database: audit\.database needs auth\.user/);
    assert.throws(() => parseConfig({ audit: { enabled: true, database: false } }), /audit\.json_lines: audit is enabled with no destination/);
    parseConfig({ audit: { enabled: true, database: false, json_lines: { path: '-' } } });
    assert.throws(() => parseConfig({ audit: { enabled: true, statment_text: 'full' } }), /audit: Unrecognized key/);
  });

  it('resolves to one audit database per gateway: database_name, else auth.database, else postgres', () => {
    const creds = { user: 'trustgate_auth', password: 'x' };
    const base = { auth: { user: 'trustgate_auth' }, listen: { port: 7000 }, audit: { enabled: true } };
    const s = resolveAuditSettings(parseConfig(base), creds);
    assert.equal(s.database?.name, 'postgres');
    assert.equal(s.instance, `${os.hostname()}:7000`);
    assert.equal(s.spoolDir, defaultSpoolDir(s.instance));
    assert.equal(resolveAuditSettings(parseConfig({ ...base, auth: { user: 'trustgate_auth', database: 'shop' } }), creds).database?.name, 'shop');
    assert.equal(resolveAuditSettings(parseConfig({ ...base, audit: { enabled: true, database_name: 'audit', instance: 'gw-a' } }), creds).database?.name, 'audit');
    assert.equal(resolveAuditSettings(parseConfig({ ...base, audit: { enabled: true, database: false, json_lines: { path: '-' } } }), creds).database, null);
  });
});

it('fingerprints cached by shape equal the parser fingerprint of each text', async () => {
  const { loadSqlParser } = await import('../../src/sql/classify.js');
  await loadSqlParser();
  const { fingerprintSync } = await import('libpg-query');
  const reference = (sql: string) => fingerprintSync(sql);
  const texts = [
    'SELECT abalance FROM pgbench_accounts WHERE aid = 1',
    'SELECT abalance FROM pgbench_accounts WHERE aid = 99999',
    'select * from t where a = 1 and b in (1, 2, 3)',
    'select * from t where a = 1 and b in (1, 2)',
    'SELECT 1',
    'SELECT 2',
    'SELECT 1, 2',
    'select x::numeric(10,2) from t where y > 5',
    'select x::numeric(12,4) from t where y > 7',
    'select ARRAY[1,2,3]::int[]',
    'insert into t values (1, 2), (3, 4)',
    'insert into t values (1, 2)',
    'update t set a = a + 1 where id = 42',
    'delete from t where id = 7 returning *',
    'with c as (select 1 as n) select n + 2 from c',
    'values (1), (2)',
    'select "t1"."c2" from "t1" where c3 = 4',
    'select x::float(24) from t',
    'select x::float(53) from t',
    'select substring(s from 2 for 3) from t',
    'select * from t limit 10 offset 20',
    'select * from t order by 1, 2',
    'select * from t order by 2, 1',
    'select * from t group by 1',
    'select $1::int + 3',
  ];
  for (const t of texts) {
    assert.equal(statementFingerprint(t), reference(t), t);
  }
});
