/**
 * Trusted sessions under load and at the edges: nothing of one end user (identity, rows, session
 * state) reaches another end user who shares the trusted user's pooled server connections, and
 * CONNECT THROUGH rule changes reach every open trusted session on every trustgate instance.
 *
 * 1. Interleaving: thousands of requests of 55 proxy users from concurrent app_tier clients
 *    (node-postgres, plus postgres.js pipelining), FOR TRANSACTION and FOR SESSION bands, every
 *    ProxyRole form, deliberate leftovers and errors; every request checks who it runs as and that
 *    it sees nothing of anyone else. Seeded (TRUSTGATE_ISO_SEED) so a failure reproduces.
 * 2. Cleanup, state kind by state kind, on one server connection (pool size 1), including state
 *    made inside functions, which the SQL text does not show.
 * 3. Two trustgate instances on one PostgreSQL: a rule changed through A reaches B's open session
 *    (the propagation time is printed).
 * 4. A rule revoked in the middle of a transaction.
 *
 * TRUSTGATE_ISO_SEED and TRUSTGATE_ISO_REQUESTS change the seed and the number of requests of 1.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import postgres from 'postgres';
import { preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';
import { setupTrustWorld } from './helpers/trust.js';
import type { Gateway } from '../src/gateway.js';

type Row = Record<string, unknown>;
type PgErr = Error & { code?: string };

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ the world

const PERMANENT = Array.from({ length: 50 }, (_, i) => `pu_${i + 1}`);
/** Permanent users that are also members of notes_role (ProxyRole=notes_role works for them). */
const NOTES_ROLE_MEMBERS = PERMANENT.slice(0, 10);
/** Application users WITH ROLE notes_reader, notes_writer (union role when no ProxyRole). */
const APP_RW = ['web_ann', 'web_ben', 'web_cid'];
/** Application users WITH ROLE notes_reader only. */
const APP_RO = ['kiosk_dan', 'kiosk_eve'];

const WORLD_SQL = `
${PERMANENT.map((u) => `CREATE ROLE ${u} LOGIN;`).join('\n')}
CREATE ROLE notes_reader NOLOGIN;
CREATE ROLE notes_writer NOLOGIN;
CREATE ROLE notes_role NOLOGIN;
GRANT notes_role TO ${NOTES_ROLE_MEMBERS.join(', ')};
GRANT ${PERMANENT.join(', ')}, notes_reader, notes_writer, notes_role TO secadm WITH ADMIN OPTION;
CREATE TABLE shop.notes (owner text NOT NULL, note text NOT NULL);
ALTER TABLE shop.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON shop.notes USING (owner = (SELECT trustgate.proxy_user())) WITH CHECK (owner = (SELECT trustgate.proxy_user()));
GRANT SELECT, INSERT ON shop.notes TO ${PERMANENT.join(', ')}, notes_writer, notes_role, alice, bob, dave;
GRANT SELECT ON shop.notes TO notes_reader;
INSERT INTO shop.notes
  SELECT u, 'seed ' || n || ' of ' || u
  FROM unnest(ARRAY[${[...PERMANENT, ...APP_RW, ...APP_RO, 'alice', 'bob', 'dave'].map((u) => `'${u}'`).join(', ')}]) AS u, generate_series(1, 2) AS n;
-- State made where the gateway cannot see it in the SQL text (section 2, indirect cases).
CREATE FUNCTION public.iso_helper_a() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE 'CREATE TEMP TABLE IF NOT EXISTS fn_leak (x int)';
  RETURN 1;
END $$;
CREATE FUNCTION public.iso_helper_b() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_lock(424242);
  PERFORM set_config('leak.fn', 'made by ' || current_user, false);
  RETURN 1;
END $$;
`;

const RULE_GRANTS = [
  `GRANT CONNECT THROUGH app_tier TO PERMANENT ${PERMANENT.slice(0, 25).join(', ')} WITHOUT ROLE`,
  `GRANT CONNECT THROUGH app_tier TO PERMANENT ${PERMANENT.slice(25).join(', ')} WITHOUT ROLE`,
  `GRANT CONNECT THROUGH app_tier TO ${APP_RW.join(', ')} WITH ROLE notes_reader, notes_writer`,
  `GRANT CONNECT THROUGH app_tier TO ${APP_RO.join(', ')} WITH ROLE notes_reader`,
  'GRANT CONNECT THROUGH app_tier TO PERMANENT alice, bob WITHOUT ROLE',
  'GRANT CONNECT THROUGH app_tier TO PERMANENT carol WITH ROLE web_reader',
];

async function connect(stack: Stack, user: string): Promise<pg.Client> {
  const c = new pg.Client({ ...stack.clientConfig(user), query_timeout: 15_000 });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function one(c: pg.Client | pg.PoolClient, sql: string, values?: unknown[]): Promise<Row> {
  return (await c.query(sql, values)).rows[0] as Row;
}

async function refused(promise: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  await assert.rejects(promise, (err: PgErr) => {
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

/** Polls `cond` every `stepMs` until true or `limitMs` passed; returns whether it became true. */
async function until(cond: () => boolean | Promise<boolean>, limitMs: number, stepMs = 20): Promise<boolean> {
  const deadline = performance.now() + limitMs;
  for (;;) {
    if (await cond()) return true;
    if (performance.now() >= deadline) return false;
    await sleep(stepMs);
  }
}

// ------------------------------------------------------------------ shared PostgreSQL

let db: EmbeddedPostgres;
let unionRole = '';
let baselineWorkMem = '';

before(async () => {
  db = await preparePostgres();
  await setupTrustWorld(db);
  await db.query(WORLD_SQL);
  // The rules, granted by the security administrator through a gateway.
  const { gw, logs } = await startGateway(db);
  const stack = stackOf(db, gw, logs, false);
  const admin = await connect(stack, 'secadm');
  try {
    for (const g of RULE_GRANTS) assert.equal((await admin.query(g)).command, 'GRANT', g);
    const granted = await admin.query(
      "SELECT proxy_user, union_role FROM trustgate.connect_rules WHERE status = 'granted' AND trusted_user = 'app_tier'",
    );
    assert.equal(granted.rows.length, PERMANENT.length + APP_RW.length + APP_RO.length + 3);
    unionRole = String(granted.rows.find((r) => r.proxy_user === APP_RW[0])!.union_role);
    assert.match(unionRole, /^tg_union_/);
    const app = await connect(stack, 'app_tier');
    baselineWorkMem = String((await one(app, "SELECT current_setting('work_mem') AS v")).v);
    await app.end();
  } finally {
    await admin.end();
    await stack.stop();
  }
});
after(async () => {
  await db?.stop();
});

// ------------------------------------------------------------------ 1. interleaving

/** mulberry32: small, fast, seedable. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const pick = <T>(rng: () => number, xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)];

const SEED = Number(process.env.TRUSTGATE_ISO_SEED ?? 20250611);
const REQUESTS = Number(process.env.TRUSTGATE_ISO_REQUESTS ?? 3000);

interface RoleForm {
  /** The ProxyRole value written in the band, or null when omitted. */
  text: string | null;
  /** current_user expected while it is in force. */
  target: string;
  canWrite: boolean;
}

function roleForms(user: string): RoleForm[] {
  if (APP_RW.includes(user)) {
    return [
      { text: null, target: unionRole, canWrite: true },
      { text: 'ALL', target: unionRole, canWrite: true },
      { text: 'notes_reader', target: 'notes_reader', canWrite: false },
      { text: 'notes_writer', target: 'notes_writer', canWrite: true },
    ];
  }
  if (APP_RO.includes(user)) {
    return [
      { text: null, target: 'notes_reader', canWrite: false },
      { text: 'ALL', target: 'notes_reader', canWrite: false },
      { text: 'notes_reader', target: 'notes_reader', canWrite: false },
    ];
  }
  const forms: RoleForm[] = [
    { text: null, target: user, canWrite: true },
    { text: 'ALL', target: user, canWrite: true },
    { text: 'NONE', target: user, canWrite: true },
    { text: user, target: user, canWrite: true },
  ];
  if (NOTES_ROLE_MEMBERS.includes(user)) forms.push({ text: 'notes_role', target: 'notes_role', canWrite: true });
  return forms;
}

const PROXIES = [...PERMANENT, ...APP_RW, ...APP_RO];

/** One request's checks in one statement (extended protocol: $1 the proxy user, $2 the request id). */
const CHECK_SQL = `SELECT pg_backend_pid() AS pid, current_user::text AS cu, trustgate.proxy_user() AS pu,
  trustgate.query_band_value('req') AS req,
  (SELECT count(*)::int FROM shop.notes WHERE owner = $1) AS own_rows,
  (SELECT count(*)::int FROM shop.notes WHERE owner <> $1) AS foreign_rows,
  (SELECT count(*)::int FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp_rels,
  to_regclass('pg_temp.leak') IS NOT NULL AS leak_table,
  (SELECT count(*)::int FROM pg_prepared_statements WHERE from_sql) AS sql_prepared,
  (SELECT count(*)::int FROM pg_cursors WHERE name <> '') AS cursors,
  (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory,
  (SELECT count(*)::int FROM pg_listening_channels()) AS listening,
  coalesce(current_setting('leak.x', true), '') AS leak_x,
  current_setting('work_mem') AS work_mem,
  $2::text AS echo`;

interface LeakAction {
  kind: string;
  sql(i: number): string;
  params?(i: number): unknown[];
}

const LEAKS: LeakAction[] = [
  { kind: 'temp table', sql: () => 'CREATE TEMP TABLE IF NOT EXISTS leak (x int)' },
  { kind: 'temp table', sql: (i) => `CREATE TEMPORARY TABLE leak_${i} AS SELECT 1 AS x` },
  { kind: 'prepared statement', sql: (i) => `PREPARE leak_${i} AS SELECT $1::int + 1` },
  { kind: 'cursor', sql: (i) => `DECLARE leak_c${i} CURSOR WITH HOLD FOR SELECT 1` },
  { kind: 'advisory lock', sql: () => 'SELECT pg_advisory_lock($1::bigint)', params: (i) => [1_000_000 + i] },
  { kind: 'advisory lock', sql: (i) => `SELECT pg_try_advisory_lock(${2_000_000 + i})` },
  { kind: 'listen', sql: (i) => `LISTEN leak_${i}` },
  { kind: 'setting', sql: (i) => `SET leak.x = 'r${i}'` },
  { kind: 'setting', sql: () => "SELECT set_config('leak.x', $1, false)", params: (i) => [`r${i}`] },
  { kind: 'setting', sql: () => "SET work_mem = '7MB'" },
];

interface Failure {
  sql: string;
  code: string;
  params?: (user: string, i: number) => unknown[];
}

const FAILURES: Failure[] = [
  { sql: 'SELECT 1/0', code: '22012' },
  { sql: 'SET ROLE postgres', code: '42501' },
  { sql: "SELECT set_config('role', 'postgres', false)", code: '42501' },
  { sql: 'SELECT count(*) FROM shop.orders', code: '42501' },
  // Someone else's row: row-level security (or the missing INSERT privilege) refuses it.
  { sql: 'INSERT INTO shop.notes VALUES ($1, $2)', code: '42501', params: (user, i) => [user === 'pu_1' ? 'pu_2' : 'pu_1', `forged ${i}`] },
];

/** What the test knows of one app_tier client connection. */
interface ClientModel {
  /** ProxyUser/ProxyRole of the session band in force, or null. */
  sessionKey: string | null;
  sessionTarget: string | null;
  sessionReq: string | null;
  /** The session band's proxy left session state (a proxy change FOR TRANSACTION is then 25001). */
  dirty: boolean;
  lastUser: string | null;
  sessionUser: string | null;
  id: number;
}
let clientIds = 0;

class Tally {
  started = 0;
  completed = 0;
  forSession = 0;
  forTransaction = 0;
  pipelined = 0;
  committed = 0;
  rolledBack = 0;
  leaksMade = 0;
  errorsMade = 0;
  refused25001 = 0;
  inserts = 0;
  /** Checks that ran on a backend right after another request left state on it. */
  handoffsAfterState = 0;
  readonly leaksMadeByKind = new Map<string, number>();
  readonly leaksSeen = new Map<string, number>();
  readonly problems: string[] = [];
  private readonly pidsWithState = new Set<number>();
  /** What each request did, and which requests ran on each backend (to explain a failure). */
  readonly trace = new Map<number, string[]>();
  readonly requestsOnPid = new Map<number, number[]>();

  note(i: number, text: string): void {
    let t = this.trace.get(i);
    if (!t) this.trace.set(i, (t = []));
    t.push(text);
  }

  ranOn(pid: number, i: number): void {
    let l = this.requestsOnPid.get(pid);
    if (!l) this.requestsOnPid.set(pid, (l = []));
    if (l[l.length - 1] !== i) l.push(i);
  }

  /** For a leak: what ran on that backend and on the victim's client before it. */
  explain(): string[] {
    const out: string[] = [];
    const show = (i: number) => `${i}: ${(this.trace.get(i) ?? []).join(' | ')}`;
    for (const p of this.problems.slice(0, 3)) {
      const m = /request (\d+)(?:.*backend (\d+)\))?/.exec(p);
      if (!m) continue;
      const [victim, pid] = [Number(m[1]), Number(m[2] ?? -1)];
      out.push(p);
      const source = /leak\.x = r(\d+)/.exec(p);
      if (source) out.push(`  source request ${show(Number(source[1]))}`);
      const onPid = this.requestsOnPid.get(pid) ?? [];
      const at = onPid.indexOf(victim);
      for (const i of onPid.slice(Math.max(0, at - 8), at + 1)) out.push(`  on backend ${pid}: ${show(i)}`);
      const client = /pg client (\d+)/.exec((this.trace.get(victim) ?? []).join(' '));
      if (client) {
        const mine = [...this.trace.keys()].filter((i) => i <= victim && (this.trace.get(i) ?? []).some((t) => t.startsWith(`pg client ${client[1]}:`)));
        for (const i of mine.slice(-5)) out.push(`  on client ${client[1]}: ${show(i)}`);
      }
    }
    return out;
  }

  leakSeen(kind: string, detail: string): void {
    this.leaksSeen.set(kind, (this.leaksSeen.get(kind) ?? 0) + 1);
    this.problem(`LEAK ${kind}: ${detail}`);
  }

  problem(text: string): void {
    if (this.problems.length < 10_000) this.problems.push(text);
  }

  stateLeftOn(pid: number): void {
    this.pidsWithState.add(pid);
  }

  /** Evaluates one CHECK_SQL row. */
  evaluate(row: Row, want: { cu: string; pu: string; req: string }, where: string): void {
    const pid = Number(row.pid);
    const i = Number(/request (\d+)/.exec(where)?.[1] ?? -1);
    this.ranOn(pid, i);
    this.note(i, `checked on ${pid}`);
    if (this.pidsWithState.delete(pid)) this.handoffsAfterState++;
    const at = `${where} (backend ${pid})`;
    if (row.cu !== want.cu) this.problem(`${at}: current_user ${String(row.cu)}, expected ${want.cu}`);
    if (row.pu !== want.pu) this.problem(`${at}: proxy_user ${String(row.pu)}, expected ${want.pu}`);
    if (row.req !== want.req) this.problem(`${at}: query band req ${String(row.req)}, expected ${want.req}`);
    if (row.echo !== want.req) this.problem(`${at}: parameter echo ${String(row.echo)}, expected ${want.req}`);
    if (Number(row.own_rows) < 2) this.problem(`${at}: sees ${String(row.own_rows)} own rows, expected at least the 2 seed rows`);
    if (Number(row.foreign_rows) !== 0) this.leakSeen('rows of other users', `${at}: ${String(row.foreign_rows)} rows`);
    if (Number(row.temp_rels) !== 0 || row.leak_table === true) this.leakSeen('temp table', `${at}: ${String(row.temp_rels)} temp relations`);
    if (Number(row.sql_prepared) !== 0) this.leakSeen('prepared statement', `${at}: ${String(row.sql_prepared)}`);
    if (Number(row.cursors) !== 0) this.leakSeen('cursor', `${at}: ${String(row.cursors)}`);
    if (Number(row.advisory) !== 0) this.leakSeen('advisory lock', `${at}: ${String(row.advisory)}`);
    if (Number(row.listening) !== 0) this.leakSeen('listen', `${at}: ${String(row.listening)}`);
    if (row.leak_x !== '') this.leakSeen('setting', `${at}: leak.x = ${String(row.leak_x)}`);
    if (row.work_mem !== baselineWorkMem) this.leakSeen('setting', `${at}: work_mem = ${String(row.work_mem)}`);
  }

  summary(): string {
    const byKind = (m: Map<string, number>) => [...m].map(([k, v]) => `${k}=${v}`).join(' ') || 'none';
    return (
      `requests started=${this.started} completed=${this.completed} (FOR SESSION ${this.forSession}, FOR TRANSACTION ${this.forTransaction}, ` +
      `postgres.js pipelined ${this.pipelined}); commits=${this.committed} rollbacks=${this.rolledBack} inserts=${this.inserts}; ` +
      `state left=${this.leaksMade} (${byKind(this.leaksMadeByKind)}); errors made=${this.errorsMade}; 25001 refusals=${this.refused25001}; ` +
      `checks right after state on the same backend=${this.handoffsAfterState}; leaks seen=${[...this.leaksSeen.values()].reduce((a, b) => a + b, 0)} (${byKind(this.leaksSeen)}); ` +
      `problems=${this.problems.length}`
    );
  }
}

function band(user: string, form: RoleForm, req: string, rng: () => number): string {
  const extra = rng() < 0.5 ? `app=shop;page=p${Math.floor(rng() * 100)};` : '';
  const role = form.text === null ? '' : `ProxyRole=${form.text};`;
  return rng() < 0.5 ? `ProxyUser=${user};${role}req=${req};${extra}` : `req=${req};${extra}ProxyUser=${user};${role}`;
}

const keyOf = (user: string, form: RoleForm) => `${user}\u0001${form.text ?? ''}`;

/** A proxy user other than the client's last one and other than its session band's. */
function chooseProxy(rng: () => number, model: { lastUser: string | null; sessionUser?: string | null }): string {
  let user = pick(rng, PROXIES);
  for (let k = 0; k < 2 && (user === model.lastUser || user === model.sessionUser); k++) user = PROXIES[(PROXIES.indexOf(user) + 1) % PROXIES.length];
  return user;
}

async function expectFailure(t: Tally, c: pg.PoolClient, f: Failure, user: string, i: number, where: string): Promise<void> {
  t.errorsMade++;
  try {
    await c.query(f.sql, f.params?.(user, i));
    t.problem(`${where}: ${f.sql} succeeded, expected ${f.code}`);
  } catch (err) {
    const code = (err as PgErr).code;
    if (code !== f.code) t.problem(`${where}: ${f.sql} failed with ${String(code)} (${(err as Error).message}), expected ${f.code}`);
  }
}

/** Makes the leftover, then notes on which backend it was left (the client is pinned there now). */
async function makeLeak(t: Tally, c: pg.PoolClient, leak: LeakAction, i: number): Promise<void> {
  t.leaksMade++;
  t.leaksMadeByKind.set(leak.kind, (t.leaksMadeByKind.get(leak.kind) ?? 0) + 1);
  await c.query(leak.sql(i), leak.params?.(i));
  const pid = Number((await one(c, 'SELECT pg_backend_pid() AS pid')).pid);
  t.note(i, `left ${leak.sql(i)} on ${pid}`);
  t.ranOn(pid, i);
  t.stateLeftOn(pid);
}

/** One request of the middle tier through node-postgres. */
async function pgRequest(t: Tally, pool: pg.Pool, models: WeakMap<object, ClientModel>, i: number): Promise<void> {
  const rng = prng((SEED ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0);
  const c = await pool.connect();
  let model = models.get(c);
  if (!model) models.set(c, (model = { sessionKey: null, sessionTarget: null, sessionReq: null, dirty: false, lastUser: null, sessionUser: null, id: ++clientIds }));
  const user = chooseProxy(rng, model);
  model.lastUser = user;
  const req = `r${i}`;
  const leak = rng() < 0.2 ? pick(rng, LEAKS) : null;
  const failure = rng() < 0.12 ? pick(rng, FAILURES) : null;
  const write = rng() < 0.3;
  const named = rng() < 0.5;
  const check = (where: string, form: RoleForm) => async () => {
    const r = named ? await c.query({ name: 'iso_check', text: CHECK_SQL, values: [user, req] }) : await c.query(CHECK_SQL, [user, req]);
    t.evaluate(r.rows[0] as Row, { cu: form.target, pu: user, req }, where);
  };
  let broken = false;
  try {
    if (rng() < 0.5) {
      // FOR SESSION: the band stays after the request unless it ends it.
      t.forSession++;
      const form = pick(rng, roleForms(user));
      const text = band(user, form, req, rng);
      const where = `request ${i} FOR SESSION '${text}'`;
      t.note(i, `pg client ${model.id}: ${where}`);
      await c.query(`SET QUERY_BAND = '${text}' FOR SESSION`);
      const key = keyOf(user, form);
      if (key !== model.sessionKey) model.dirty = false; // the previous proxy's state goes first
      model.sessionKey = key;
      model.sessionUser = user;
      model.sessionTarget = form.target;
      model.sessionReq = req;
      await check(where, form)();
      if (write && form.canWrite) {
        t.inserts++;
        const r = await c.query('INSERT INTO shop.notes VALUES ($1, $2)', [user, `note ${req}`]);
        if (r.rowCount !== 1) t.problem(`${where}: insert wrote ${r.rowCount} rows`);
      }
      if (leak) {
        await makeLeak(t, c, leak, i);
        model.dirty = true;
      }
      if (failure) {
        await expectFailure(t, c, failure, user, i, where);
        const after = await one(c, "SELECT current_user::text AS cu, trustgate.query_band_value('req') AS req");
        if (after.cu !== form.target || after.req !== req) t.problem(`${where}: after the error runs as ${String(after.cu)} with req ${String(after.req)}`);
      }
      if (rng() < 0.3) {
        t.note(i, 'NONE FOR SESSION');
        await c.query('SET QUERY_BAND = NONE FOR SESSION');
        model.sessionKey = model.sessionTarget = model.sessionReq = model.sessionUser = null;
        model.dirty = false;
        if (rng() < 0.5) {
          const who = await one(c, 'SELECT current_user::text AS cu, trustgate.proxy_user() AS pu');
          if (who.cu !== 'app_tier' || who.pu !== null) t.problem(`${where}: after NONE runs as ${String(who.cu)} for ${String(who.pu)}`);
        }
      }
    } else {
      // FOR TRANSACTION: inside BEGIN … COMMIT/ROLLBACK, over the session band if one is kept.
      t.forTransaction++;
      if (model.sessionKey !== null && rng() < 0.5) {
        t.note(i, `pg client ${model.id}: NONE FOR SESSION first`);
        await c.query('SET QUERY_BAND = NONE FOR SESSION');
        model.sessionKey = model.sessionTarget = model.sessionReq = model.sessionUser = null;
        model.dirty = false;
      }
      const kept = model.sessionKey !== null;
      // Over a kept session band the ProxyRole is written, so the session's does not carry over.
      const forms = roleForms(user).filter((f) => !kept || f.text !== null);
      const form = pick(rng, forms);
      const text = band(user, form, req, rng);
      const where = `request ${i} FOR TRANSACTION '${text}'${kept ? ' over a session band' : ''}`;
      t.note(i, `pg client ${model.id}: ${where}${kept && model.dirty ? ' (expect 25001)' : ''}`);
      await c.query('BEGIN');
      if (kept && model.dirty) {
        // The session's proxy left state: it cannot be cleared inside this transaction.
        try {
          await c.query(`SET QUERY_BAND = '${text}' FOR TRANSACTION`);
          t.problem(`${where}: proxy change accepted although the session proxy left state (expected 25001)`);
        } catch (err) {
          if ((err as PgErr).code === '25001') t.refused25001++;
          else t.problem(`${where}: failed with ${String((err as PgErr).code)} ${(err as Error).message}, expected 25001`);
        }
        await c.query('ROLLBACK');
        t.rolledBack++;
        t.completed++;
        return;
      }
      await c.query(`SET QUERY_BAND = '${text}' FOR TRANSACTION`);
      await check(where, form)();
      if (write && form.canWrite) {
        t.inserts++;
        await c.query('INSERT INTO shop.notes VALUES ($1, $2)', [user, `note ${req}`]);
      }
      if (leak) await makeLeak(t, c, leak, i);
      let aborted = false;
      if (failure) {
        await expectFailure(t, c, failure, user, i, where);
        aborted = true;
      }
      if (aborted || rng() < 0.3) {
        t.note(i, 'ROLLBACK');
        await c.query('ROLLBACK');
        t.rolledBack++;
      } else {
        t.note(i, 'COMMIT');
        const r = await c.query('COMMIT');
        if (r.command !== 'COMMIT') t.problem(`${where}: COMMIT answered ${r.command}`);
        t.committed++;
      }
      if (rng() < 0.4) {
        // The transaction band ended with the transaction.
        const who = await one(c, "SELECT current_user::text AS cu, trustgate.query_band_value('req') AS req");
        const cu = model.sessionTarget ?? 'app_tier';
        if (who.cu !== cu || who.req !== model.sessionReq) {
          t.problem(`${where}: after the transaction runs as ${String(who.cu)} with req ${String(who.req)}, expected ${cu} / ${String(model.sessionReq)}`);
        }
      }
    }
    t.completed++;
  } catch (err) {
    broken = true;
    t.problem(`request ${i} for ${user}: unexpected ${String((err as PgErr).code)} ${(err as Error).message}`);
  } finally {
    c.release(broken);
  }
}

/** One FOR TRANSACTION request through postgres.js, band and statements pipelined. */
async function pipelinedRequest(t: Tally, sql: postgres.Sql, model: { lastUser: string | null }, i: number): Promise<void> {
  const rng = prng((SEED ^ Math.imul(i + 1, 0x85ebca6b)) >>> 0);
  const user = chooseProxy(rng, model);
  model.lastUser = user;
  const form = pick(rng, roleForms(user));
  const req = `j${i}`;
  const text = band(user, form, req, rng);
  const leak = rng() < 0.2 ? pick(rng, LEAKS) : null;
  const fail = rng() < 0.1;
  const write = form.canWrite && rng() < 0.3;
  const where = `request ${i} (postgres.js) FOR TRANSACTION '${text}'`;
  t.pipelined++;
  t.forTransaction++;
  t.note(i, `postgres.js ${where}${leak ? ` leaving ${leak.sql(i)}` : ''}${write ? ' insert' : ''}${fail ? ' failing' : ''}`);
  let checkRow: Row | null = null;
  let pid = 0;
  try {
    await sql.begin(async (tx) => {
      const queries: Promise<unknown>[] = [tx.unsafe(`SET QUERY_BAND = '${text}' FOR TRANSACTION`), tx.unsafe(CHECK_SQL, [user, req])];
      if (write) queries.push(tx`INSERT INTO shop.notes VALUES (${user}, ${'pipelined ' + req})`);
      if (leak) queries.push(tx.unsafe(leak.sql(i), (leak.params?.(i) ?? []) as postgres.ParameterOrJSON<never>[]));
      if (fail) queries.push(tx.unsafe('SELECT 1/0'));
      const settled = await Promise.allSettled(queries);
      if (settled[1].status === 'fulfilled') {
        checkRow = (settled[1].value as Row[])[0];
        pid = Number(checkRow.pid);
      }
      const rejected = settled.find((s) => s.status === 'rejected') as PromiseRejectedResult | undefined;
      if (rejected) throw rejected.reason;
    });
    if (fail) t.problem(`${where}: division by zero succeeded`);
    t.committed++;
    if (write) t.inserts++;
  } catch (err) {
    if (!fail || (err as PgErr).code !== '22012') t.problem(`${where}: unexpected ${String((err as PgErr).code)} ${(err as Error).message}`);
    t.rolledBack++;
  }
  if (fail) t.errorsMade++;
  if (pid) t.ranOn(pid, i);
  if (leak) {
    t.leaksMade++;
    t.leaksMadeByKind.set(leak.kind, (t.leaksMadeByKind.get(leak.kind) ?? 0) + 1);
    if (pid) t.stateLeftOn(pid);
  }
  if (checkRow) t.evaluate(checkRow, { cu: form.target, pu: user, req }, where);
  else t.problem(`${where}: no check row`);
  t.completed++;
}

/**
 * A worker is done: a client holding state of its last end user keeps its server connection
 * (transaction mode pins it) until its next request, which would starve the requests still
 * running on the small pool. The client (by LIFO most likely the worker's own) ends its band.
 */
async function drain(pool: pg.Pool, models: WeakMap<object, ClientModel>): Promise<void> {
  const c = await pool.connect();
  try {
    await c.query('SET QUERY_BAND = NONE FOR SESSION');
    await c.query('SELECT 1');
    const m = models.get(c);
    if (m) Object.assign(m, { sessionKey: null, sessionUser: null, sessionTarget: null, sessionReq: null, dirty: false });
  } finally {
    c.release();
  }
}

for (const mode of ['transaction', 'session'] as const) {
  describe(`trusted isolation under interleaved load (${mode} mode)`, () => {
    const pgClients = mode === 'transaction' ? 12 : 6;
    const pipelinedClients = 2;
    let stack: Stack;

    before(async () => {
      const size = mode === 'transaction' ? 3 : pgClients + pipelinedClients;
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: size, wait_timeout_ms: 10_000 }, log: { level: 'warn' } });
      stack = stackOf(db, gw, logs, false);
    });
    after(async () => {
      await stack?.stop();
    });

    it(`runs ${REQUESTS} requests of ${PROXIES.length} proxy users from ${pgClients + pipelinedClients} app_tier connections without a leak`, { timeout: 120_000 }, async (ctx) => {
      const t = new Tally();
      const pool = new pg.Pool({ ...stack.clientConfig('app_tier'), max: pgClients, query_timeout: 15_000, idleTimeoutMillis: 0 });
      pool.on('error', () => undefined);
      const pjs = Array.from({ length: pipelinedClients }, () =>
        postgres(stack.url('app_tier'), { max: 1, onnotice: () => undefined, connect_timeout: 10, idle_timeout: 0 }),
      );
      const models = new WeakMap<object, ClientModel>();
      const started = performance.now();
      const deadline = started + 75_000;
      let next = 0;
      const take = (): number | null => (next < REQUESTS && performance.now() < deadline ? next++ : null);
      try {
        const workers: Promise<void>[] = [];
        for (let w = 0; w < pgClients; w++) {
          workers.push(
            (async () => {
              for (let i = take(); i !== null; i = take()) {
                t.started++;
                await pgRequest(t, pool, models, i);
              }
              await drain(pool, models);
            })(),
          );
        }
        for (const sql of pjs) {
          const model = { lastUser: null as string | null };
          workers.push(
            (async () => {
              for (let i = take(); i !== null; i = take()) {
                t.started++;
                await pipelinedRequest(t, sql, model, i);
              }
              await sql`SELECT 1`; // clears what the last end user left, so the server is free again
            })(),
          );
        }
        await Promise.all(workers);
      } finally {
        await pool.end().catch(() => undefined);
        await Promise.all(pjs.map((s) => s.end({ timeout: 2 }).catch(() => undefined)));
      }
      const seconds = (performance.now() - started) / 1000;
      const summary = `${mode} mode, seed ${SEED}: ${t.summary()}; ${seconds.toFixed(1)} s, ${Math.round(t.completed / seconds)} requests/s`;
      ctx.diagnostic(summary);
      console.log(summary);
      if (t.problems.length) console.log(`first problems:\n  ${t.problems.slice(0, 25).join('\n  ')}\n${t.explain().join('\n')}`);
      assert.ok(t.started >= REQUESTS, `only ${t.started} of ${REQUESTS} requests started before the time limit`);
      assert.equal(t.completed, t.started, 'every request started must complete');
      assert.ok(t.leaksMade > REQUESTS / 10, 'requests must leave state behind');
      assert.ok(t.handoffsAfterState > 0, 'some requests must run on a backend right after state was left there');
      assert.deepEqual([...t.leaksSeen], [], 'no end user may see state of another');
      assert.deepEqual(t.problems.slice(0, 25), []);
    });
  });
}

// ------------------------------------------------------------------ 2. cleanup, kind by kind

interface StateKind {
  name: string;
  /** Statements that leave the state (as alice). */
  make: string[];
  /** Is the state there? One row with column p. */
  probe: string;
  /** Survives ROLLBACK of the transaction that made it. */
  survivesRollback?: boolean;
  /** Must run inside a transaction block. */
  txOnly?: boolean;
  /** Takes effect at COMMIT (LISTEN): not visible inside the transaction that made it. */
  atCommit?: boolean;
}

const KINDS: StateKind[] = [
  { name: 'temp table', make: ['CREATE TEMP TABLE leak (x int)', 'INSERT INTO leak VALUES (1)'], probe: "SELECT to_regclass('pg_temp.leak') IS NOT NULL AS p" },
  { name: 'SQL prepared statement', make: ['PREPARE leak_stmt AS SELECT 1'], probe: "SELECT count(*) > 0 AS p FROM pg_prepared_statements WHERE name = 'leak_stmt'", survivesRollback: true },
  { name: 'cursor WITH HOLD', make: ['DECLARE leak_c CURSOR WITH HOLD FOR SELECT 1'], probe: "SELECT count(*) > 0 AS p FROM pg_cursors WHERE name = 'leak_c'" },
  { name: 'session advisory lock', make: ['SELECT pg_advisory_lock(4711)'], probe: "SELECT count(*) > 0 AS p FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", survivesRollback: true },
  { name: 'LISTEN', make: ['LISTEN leak'], probe: 'SELECT count(*) > 0 AS p FROM pg_listening_channels()', atCommit: true },
  { name: 'custom setting (SET)', make: ["SET leak.x = 'from alice'"], probe: "SELECT coalesce(current_setting('leak.x', true), '') <> '' AS p" },
  { name: 'custom setting (set_config)', make: ["SELECT set_config('leak.y', 'from alice', false)"], probe: "SELECT coalesce(current_setting('leak.y', true), '') <> '' AS p" },
  { name: 'standard setting', make: ["SET work_mem = '7MB'", "SET search_path = shop, public"], probe: "SELECT current_setting('work_mem') = '7MB' OR current_setting('search_path') = 'shop, public' AS p" },
  // A temp table without TEMP: the gateway sees it through the search_path change (GUC_REPORT).
  {
    name: 'temp table through SET LOCAL search_path = pg_temp',
    make: ['SET LOCAL search_path = pg_temp', 'CREATE TABLE sneaky (x int)'],
    probe: "SELECT to_regclass('pg_temp.sneaky') IS NOT NULL AS p",
    txOnly: true,
  },
];

/** State the gateway cannot see in the statement text. */
const INDIRECT_KINDS: StateKind[] = [
  { name: 'temp table made inside a function', make: ['SELECT public.iso_helper_a()'], probe: "SELECT to_regclass('pg_temp.fn_leak') IS NOT NULL AS p" },
  {
    name: 'advisory lock and setting taken inside a function',
    make: ['SELECT public.iso_helper_b()'],
    probe: "SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) > 0 OR coalesce(current_setting('leak.fn', true), '') <> '' AS p",
    survivesRollback: true,
  },
];

/** Everything at once, for the "sees nothing" checks. */
const CLEAN_SQL = `SELECT pg_backend_pid() AS pid, current_user::text AS cu,
  (SELECT count(*)::int FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp_rels,
  (SELECT count(*)::int FROM pg_prepared_statements WHERE from_sql) AS sql_prepared,
  (SELECT count(*)::int FROM pg_cursors WHERE name <> '') AS cursors,
  (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory,
  (SELECT count(*)::int FROM pg_listening_channels()) AS listening,
  coalesce(current_setting('leak.x', true), '') || coalesce(current_setting('leak.y', true), '') || coalesce(current_setting('leak.fn', true), '') AS custom,
  current_setting('work_mem') AS work_mem, current_setting('search_path') AS search_path`;

async function assertClean(c: pg.Client, cu: string, pid: number, what: string): Promise<void> {
  const r = await one(c, CLEAN_SQL);
  assert.deepEqual(
    r,
    { pid, cu, temp_rels: 0, sql_prepared: 0, cursors: 0, advisory: 0, listening: 0, custom: '', work_mem: baselineWorkMem, search_path: '"$user", public' },
    what,
  );
}

const ALICE = "SET QUERY_BAND = 'ProxyUser=alice;req=a;' FOR SESSION";
const BOB = "SET QUERY_BAND = 'ProxyUser=bob;req=b;' FOR SESSION";

async function present(c: pg.Client, k: StateKind): Promise<boolean> {
  return (await one(c, k.probe)).p === true;
}

/** current_user and proxy_user, or the error the request got. */
async function whoOrError(c: pg.Client): Promise<Row> {
  try {
    return await one(c, 'SELECT current_user::text AS cu, trustgate.proxy_user() AS pu');
  } catch (err) {
    return { error: (err as PgErr).code, message: (err as Error).message };
  }
}

async function pidOf(c: pg.Client): Promise<number> {
  return Number((await one(c, 'SELECT pg_backend_pid() AS pid')).pid);
}

/** One way for alice to leave state and for the next user to (not) see it. */
interface Flow {
  name: string;
  applies(k: StateKind): boolean;
  run(k: StateKind, app: () => Promise<pg.Client>, close: (c: pg.Client) => Promise<void>): Promise<void>;
}

const FLOWS: Flow[] = [
  {
    name: 'FOR SESSION: alice leaves it, bob on the same connection does not see it',
    applies: (k) => !k.txOnly,
    async run(k, app, close) {
      const c = await app();
      try {
        await c.query(ALICE);
        const pid = await pidOf(c);
        for (const s of k.make) await c.query(s);
        assert.equal(await present(c, k), true, 'alice sees her own state');
        await c.query(BOB);
        assert.equal(await present(c, k), false, "bob must not see alice's state");
        await assertClean(c, 'bob', pid, 'bob sees a clean session');
        await c.query('SET QUERY_BAND = NONE FOR SESSION');
        await assertClean(c, 'app_tier', pid, 'app_tier after the proxy ended');
      } finally {
        await close(c);
      }
    },
  },
  {
    name: "FOR TRANSACTION + COMMIT: alice leaves it, bob's next transaction does not see it",
    applies: () => true,
    async run(k, app, close) {
      const c = await app();
      try {
        await c.query('BEGIN');
        await c.query("SET QUERY_BAND = 'ProxyUser=alice;req=a;' FOR TRANSACTION");
        const pid = await pidOf(c);
        for (const s of k.make) await c.query(s);
        if (!k.atCommit) assert.equal(await present(c, k), true, 'alice sees her own state');
        assert.equal((await c.query('COMMIT')).command, 'COMMIT');
        assert.equal(await present(c, k), false, "the trusted user must not see alice's state after her transaction");
        await c.query('BEGIN');
        await c.query("SET QUERY_BAND = 'ProxyUser=bob;req=b;' FOR TRANSACTION");
        assert.equal(await present(c, k), false, "bob must not see alice's state");
        await assertClean(c, 'bob', pid, 'bob sees a clean session');
        await c.query('COMMIT');
      } finally {
        await close(c);
      }
    },
  },
  {
    name: 'FOR TRANSACTION + ROLLBACK: what survives the rollback is not seen by bob',
    applies: (k) => k.survivesRollback === true,
    async run(k, app, close) {
      const c = await app();
      try {
        await c.query('BEGIN');
        await c.query("SET QUERY_BAND = 'ProxyUser=alice;req=a;' FOR TRANSACTION");
        const pid = await pidOf(c);
        for (const s of k.make) await c.query(s);
        await c.query('ROLLBACK');
        await c.query(BOB);
        assert.equal(await present(c, k), false, "bob must not see alice's state");
        await assertClean(c, 'bob', pid, 'bob sees a clean session');
      } finally {
        await close(c);
      }
    },
  },
  {
    name: 'refuses (25001) a proxy change FOR TRANSACTION after alice left it in the same transaction',
    applies: () => true,
    async run(k, app, close) {
      const c = await app();
      try {
        await c.query('BEGIN');
        await c.query("SET QUERY_BAND = 'ProxyUser=alice;req=a;' FOR TRANSACTION");
        const pid = await pidOf(c);
        for (const s of k.make) await c.query(s);
        await refused(c.query("SET QUERY_BAND = 'ProxyUser=bob;req=b;' FOR TRANSACTION"), '25001', /proxy/);
        await refused(c.query('SELECT current_user'), '25P02');
        await c.query('ROLLBACK');
        await c.query(BOB);
        assert.equal(await present(c, k), false, "bob must not see alice's state");
        await assertClean(c, 'bob', pid, 'bob sees a clean session');
      } finally {
        await close(c);
      }
    },
  },
  {
    name: "refuses (25001) a proxy change FOR TRANSACTION after the session proxy left it, and keeps alice's session as it was",
    applies: (k) => !k.txOnly,
    async run(k, app, close) {
      const c = await app();
      try {
        await c.query(ALICE);
        for (const s of k.make) await c.query(s);
        await c.query('BEGIN');
        await refused(c.query("SET QUERY_BAND = 'ProxyUser=bob;req=b;' FOR TRANSACTION"), '25001');
        await c.query('ROLLBACK');
        assert.equal((await one(c, 'SELECT current_user::text AS cu')).cu, 'alice');
        assert.equal(await present(c, k), true, 'alice still has her state');
        await c.query(BOB);
        assert.equal(await present(c, k), false, "bob must not see alice's state");
      } finally {
        await close(c);
      }
    },
  },
  {
    name: 'after disconnect: a new client on the same server connection sees nothing',
    applies: () => true,
    async run(k, app, close) {
      const a = await app();
      let pid: number;
      try {
        await a.query(ALICE);
        pid = await pidOf(a);
        if (k.txOnly) await a.query('BEGIN');
        for (const s of k.make) await a.query(s);
        if (k.txOnly) await a.query('COMMIT');
        assert.equal(await present(a, k), true, 'alice sees her own state');
      } finally {
        await close(a);
      }
      const b = await app();
      try {
        assert.equal(await pidOf(b), pid, 'the new client must get the same server connection (pool size 1)');
        assert.equal(await present(b, k), false, "the next client must not see alice's state");
        await assertClean(b, 'app_tier', pid, 'the next client sees a clean session');
        await b.query(BOB);
        assert.equal(await present(b, k), false, "bob must not see alice's state");
      } finally {
        await close(b);
      }
    },
  },
];

for (const mode of ['transaction', 'session'] as const) {
  describe(`trusted isolation: cleanup of each kind of state on one server connection (${mode} mode)`, () => {
    let stack: Stack;
    const open = new Set<pg.Client>();
    const app = async () => {
      const c = await connect(stack, 'app_tier');
      open.add(c);
      return c;
    };
    const close = async (c: pg.Client) => {
      open.delete(c);
      await c.end();
    };

    before(async () => {
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 1, wait_timeout_ms: 5000 } });
      stack = stackOf(db, gw, logs, false);
    });
    after(async () => {
      await Promise.all([...open].map((c) => c.end().catch(() => undefined)));
      await stack?.stop();
    });

    for (const k of KINDS) {
      describe(k.name, () => {
        for (const flow of FLOWS.filter((f) => f.applies(k))) it(flow.name, () => flow.run(k, app, close));
      });
    }

    it('state made inside functions (not visible in the SQL text) is cleared with reset_after_proxy: always', async (t) => {
      // With the default (detected), state made inside server-side functions is a documented limit.
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 1, wait_timeout_ms: 5000 }, trusted_sessions: { reset_after_proxy: 'always' } });
      const always = stackOf(db, gw, logs, false);
      const appAlways = async () => {
        const c = await connect(always, 'app_tier');
        open.add(c);
        return c;
      };
      const failures: string[] = [];
      try {
        for (const k of INDIRECT_KINDS) {
          for (const flow of FLOWS.filter((f) => f.applies(k))) {
            try {
              await flow.run(k, appAlways, close);
            } catch (err) {
              failures.push(`${k.name} / ${flow.name}: ${(err as Error).message.split('\n')[0]}`);
            }
          }
        }
      } finally {
        await always.stop();
      }
      for (const f of failures) t.diagnostic(f);
      assert.deepEqual(failures, [], 'the next end user sees state the previous one made inside functions');
    });

    it('after disconnect with every kind of state at once (FOR SESSION, and inside an open transaction)', async () => {
      for (const inTransaction of [false, true]) {
        const a = await app();
        let pid: number;
        try {
          if (inTransaction) {
            await a.query('BEGIN');
            await a.query("SET QUERY_BAND = 'ProxyUser=alice;req=a;' FOR TRANSACTION");
          } else await a.query(ALICE);
          pid = await pidOf(a);
          for (const k of KINDS.filter((x) => inTransaction || !x.txOnly)) for (const s of k.make) await a.query(s);
        } finally {
          await close(a); // inside a transaction: the gateway must not reuse it as it is
        }
        const b = await app();
        try {
          const pidB = await pidOf(b);
          if (!inTransaction) assert.equal(pidB, pid, 'the new client must get the same server connection (pool size 1)');
          await assertClean(b, 'app_tier', pidB, `next client after alice disconnected${inTransaction ? ' in a transaction' : ''}`);
        } finally {
          await close(b);
        }
      }
    });
  });
}

// ------------------------------------------------------------------ 3 + 4. rule changes on two instances

describe('trusted isolation: CONNECT THROUGH changes across two trustgate instances', () => {
  let stackA: Stack;
  let stackB: Stack;
  let gwB: Gateway;
  let admin: pg.Client;
  let appA: pg.Client;
  let appB: pg.Client;
  /** [ms from sending the change, ms from its reply] until B had reloaded. */
  const propagation: [number, number][] = [];

  /** The rules store B's app_tier sessions use. */
  const storeB = () => gwB.rulesFor(gwB.poolFor('postgres', 'app_tier'));

  /** Waits until B's rules are stable (no reload running or arriving for 100 ms). */
  async function settleB(): Promise<void> {
    let last = -1;
    let since = performance.now();
    const ok = await until(() => {
      const s = storeB();
      if (!s.ready || s.version !== last) {
        last = s.version;
        since = performance.now();
        return false;
      }
      return performance.now() - since >= 100;
    }, 5000);
    assert.ok(ok, 'instance B rules did not settle');
  }

  /**
   * Runs a rule change through A and waits (bounded 5 s, 20 ms steps) until B has reloaded its
   * rules. A 1 ms sampler measures when B's reload finished, from sending the change and from its
   * reply to the administrator (0 when B was done before the reply arrived).
   */
  async function changeThroughA(sql: string, tag: 'GRANT' | 'REVOKE'): Promise<string> {
    await settleB();
    const before = storeB().version;
    const reloadedB = () => storeB().ready && storeB().version > before;
    let seenAt = 0;
    const sampler = setInterval(() => {
      if (!seenAt && reloadedB()) seenAt = performance.now();
    }, 1);
    try {
      const sent = performance.now();
      const r = await admin.query(sql);
      const replied = performance.now();
      assert.equal(r.command, tag);
      const reloaded = await until(reloadedB, 5000, 20);
      assert.ok(reloaded, `instance B did not reload its rules within 5 s after: ${sql}`);
      seenAt ||= performance.now();
      const m: [number, number] = [seenAt - sent, Math.max(0, seenAt - replied)];
      propagation.push(m);
      return `${tag} reached instance B ${m[0].toFixed(1)} ms after it was sent, ${m[1].toFixed(1)} ms after A's reply`;
    } finally {
      clearInterval(sampler);
    }
  }

  before(async () => {
    const a = await startGateway(db, { pool: { mode: 'transaction', default_size: 3 } });
    stackA = stackOf(db, a.gw, a.logs, false);
    const b = await startGateway(db, { pool: { mode: 'session', default_size: 3 } });
    gwB = b.gw;
    stackB = stackOf(db, b.gw, b.logs, false);
    admin = await connect(stackA, 'secadm');
    appA = await connect(stackA, 'app_tier');
    appB = await connect(stackB, 'app_tier');
    await appB.query('SELECT 1'); // B's rules store exists and is loaded
    await settleB();
  });
  after(async () => {
    for (const c of [admin, appA, appB]) await c?.end().catch(() => undefined);
    await stackB?.stop();
    await stackA?.stop();
    if (propagation.length) {
      const fmt = (xs: number[]) => `min ${Math.min(...xs).toFixed(1)} / median ${xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)].toFixed(1)} / max ${Math.max(...xs).toFixed(1)} ms`;
      console.log(
        `rule propagation A -> B over ${propagation.length} changes: from sending ${fmt(propagation.map((m) => m[0]))}; after A's reply ${fmt(propagation.map((m) => m[1]))}`,
      );
    }
  });

  it('a revoke through A fails the next request of B\'s open session for dave once B reloaded', async (t) => {
    const grant = await changeThroughA('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE', 'GRANT');
    await appB.query("SET QUERY_BAND = 'ProxyUser=dave;req=b1;' FOR SESSION");
    assert.equal((await one(appB, 'SELECT current_user::text AS cu')).cu, 'dave');
    const revoke = await changeThroughA('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave', 'REVOKE');
    t.diagnostic(grant);
    t.diagnostic(revoke);
    await refused(appB.query('SELECT current_user'), '42501', /dave/);
    await refused(appB.query('SELECT 1'), '42501', /dave/);
  });

  it('a re-GRANT through A makes B\'s session work again as dave', async (t) => {
    t.diagnostic(await changeThroughA('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE', 'GRANT'));
    const who = await one(appB, "SELECT current_user::text AS cu, trustgate.proxy_user() AS pu, trustgate.query_band_value('req') AS req");
    assert.deepEqual(who, { cu: 'dave', pu: 'dave', req: 'b1' });
  });

  it('a rule change through A for another proxy does not break B\'s current proxy', async () => {
    await changeThroughA('REVOKE CONNECT THROUGH app_tier FROM PERMANENT carol', 'REVOKE');
    assert.equal((await one(appB, 'SELECT current_user::text AS cu')).cu, 'dave');
    await changeThroughA('GRANT CONNECT THROUGH app_tier TO PERMANENT carol WITH ROLE web_reader', 'GRANT');
    assert.equal((await one(appB, 'SELECT current_user::text AS cu')).cu, 'dave');
    await changeThroughA('REVOKE CONNECT THROUGH app_tier FROM PERMANENT pu_50', 'REVOKE');
    assert.equal((await one(appB, 'SELECT current_user::text AS cu')).cu, 'dave');
    await changeThroughA('GRANT CONNECT THROUGH app_tier TO PERMANENT pu_50 WITHOUT ROLE', 'GRANT');
    assert.deepEqual(await one(appB, "SELECT current_user::text AS cu, trustgate.query_band_value('req') AS req"), { cu: 'dave', req: 'b1' });
    await appB.query('SET QUERY_BAND = NONE FOR SESSION');
  });

  it('same instance: a revoke through A fails the very next request of A\'s session, without waiting', async () => {
    await appA.query("SET QUERY_BAND = 'ProxyUser=dave;req=a1;' FOR SESSION");
    assert.equal((await one(appA, 'SELECT current_user::text AS cu')).cu, 'dave');
    assert.equal((await admin.query('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave')).command, 'REVOKE');
    await refused(appA.query('SELECT current_user'), '42501', /dave/);
    await appA.query('SET QUERY_BAND = NONE FOR SESSION');
    assert.equal((await one(appA, 'SELECT current_user::text AS cu')).cu, 'app_tier');
    await refused(appA.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION"), '42501', /dave/);
  });

  it('a revoke in the middle of a FOR TRANSACTION band fails the next statement, ROLLBACK works, the session stays usable (same instance)', async () => {
    assert.equal((await admin.query('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE')).command, 'GRANT');
    await appA.query('BEGIN');
    await appA.query("SET QUERY_BAND = 'ProxyUser=dave;req=t1;' FOR TRANSACTION");
    assert.equal((await one(appA, 'SELECT current_user::text AS cu')).cu, 'dave');
    assert.equal((await admin.query('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave')).command, 'REVOKE');
    await refused(appA.query('SELECT current_user'), '42501', /dave/);
    await refused(appA.query('SELECT 1'), '25P02');
    assert.equal((await appA.query('ROLLBACK')).command, 'ROLLBACK');
    assert.deepEqual(await whoOrError(appA), { cu: 'app_tier', pu: null }, 'after ROLLBACK the transaction band is gone: the session runs as the trusted user again');
    await appA.query('BEGIN');
    await refused(appA.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR TRANSACTION"), '42501', /dave/);
    await appA.query('ROLLBACK');
    await appA.query("SET QUERY_BAND = 'ProxyUser=alice;req=t2;' FOR SESSION");
    assert.equal((await one(appA, 'SELECT current_user::text AS cu')).cu, 'alice');
    await appA.query('SET QUERY_BAND = NONE FOR SESSION');
  });

  it('a revoke through A in the middle of a FOR TRANSACTION band on B fails B\'s next statement once B reloaded', async () => {
    await changeThroughA('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE', 'GRANT');
    await appB.query('BEGIN');
    await appB.query("SET QUERY_BAND = 'ProxyUser=dave;req=t3;' FOR TRANSACTION");
    assert.equal((await one(appB, 'SELECT current_user::text AS cu')).cu, 'dave');
    await changeThroughA('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave', 'REVOKE');
    await refused(appB.query('SELECT current_user'), '42501', /dave/);
    await refused(appB.query('SELECT 1'), '25P02');
    assert.equal((await appB.query('ROLLBACK')).command, 'ROLLBACK');
    assert.deepEqual(await whoOrError(appB), { cu: 'app_tier', pu: null }, 'after ROLLBACK the transaction band is gone: the session runs as the trusted user again');
  });
});
