/**
 * Escape attempts from a trusted session, end to end through trustgate in both pool modes, with
 * node-postgres (simple and extended protocol), postgres.js (extended, pipelined) and hand-made
 * protocol messages. With a proxy in force (carol WITH ROLE web_reader → current_user web_reader;
 * alice WITHOUT ROLE → current_user alice) every attempt to change the identity must be refused
 * (42501) or fail in PostgreSQL without effect, and afterwards current_user, session_user,
 * trustgate.proxy_user() and the rows row-level security shows must be exactly as before.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import postgres from 'postgres';
import { preparePostgres, startGateway, stackOf, USERS, type Stack } from './helpers/stack.js';
import { setupTrustWorld, STORY_GRANTS, TRUST_USERS } from './helpers/trust.js';
import { rawLogin, errorFields, type RawConnection, type BackendMessage } from './helpers/raw-client.js';
import { MessageWriter } from '../src/protocol/writer.js';

// ------------------------------------------------------------------------------------ world

/** Objects the escape tests need besides the trust world, created by the superuser directly. */
const ESCAPE_SETUP_SQL = `
CREATE TABLE shop.escape_marks (note text);
GRANT SELECT, INSERT ON shop.escape_marks TO PUBLIC;
CREATE ROLE app_helper NOLOGIN;
GRANT app_helper TO app;
-- Server-side code the gateway cannot see: it writes the identity settings / the role itself.
CREATE FUNCTION public.forge_identity(tok text, mac text) RETURNS void
  LANGUAGE plpgsql SECURITY INVOKER
AS $fn$BEGIN
  PERFORM set_config('trustgate.identity', tok, false);
  PERFORM set_config('trustgate.identity_mac', mac, false);
END$fn$;
REVOKE ALL ON FUNCTION public.forge_identity(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.forge_identity(text, text) TO web_reader, alice, app_tier;
CREATE FUNCTION public.hidden_set_role(r text) RETURNS text
  LANGUAGE plpgsql SECURITY INVOKER
AS $fn$BEGIN RETURN set_config('role', r, false); END$fn$;
GRANT EXECUTE ON FUNCTION public.hidden_set_role(text) TO PUBLIC;
`;

interface State {
  cu: string;
  su: string;
  pu: string | null;
  /** Rows of shop.orders row-level security shows. */
  n: number;
}

const CAROL: State = { cu: 'web_reader', su: 'app_tier', pu: 'carol', n: 1 };
const ALICE: State = { cu: 'alice', su: 'app_tier', pu: 'alice', n: 2 };
const PLAIN: State = { cu: 'app_tier', su: 'app_tier', pu: null, n: 0 };

const BAND_CAROL = "SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION";
const BAND_ALICE = "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION";

const PROXIES = [
  { name: 'carol WITH ROLE web_reader', band: BAND_CAROL, state: CAROL, other: { band: "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION", state: ALICE } },
  { name: 'alice WITHOUT ROLE', band: BAND_ALICE, state: ALICE, other: { band: "SET QUERY_BAND = 'ProxyUser=carol;' FOR TRANSACTION", state: CAROL } },
] as const;

const STATE_SQL =
  'SELECT current_user AS cu, session_user AS su, trustgate.proxy_user() AS pu, (SELECT count(*)::int FROM shop.orders) AS n';

const T = { timeout: 30_000 };

/** A malformed or misplaced SET QUERY_BAND: any of these is a refusal. */
const BAND_ERR = ['42601', '22023', '0A000'] as const;

// ------------------------------------------------------------------------------------ clients

async function client(stack: Stack, user: string): Promise<pg.Client> {
  const c = new pg.Client({ ...stack.clientConfig(user), query_timeout: 15_000 });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

type PgErr = Error & { code?: string };

/** The promise fails with one of `codes` (and `message`, if given). */
async function refused(promise: Promise<unknown>, codes: string | readonly string[], message?: RegExp, label = ''): Promise<PgErr> {
  const list = typeof codes === 'string' ? [codes] : codes;
  let caught: PgErr | undefined;
  await assert.rejects(promise, (err: PgErr) => {
    assert.ok(list.includes(String(err.code)), `${label}: expected ${list.join('|')}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message, label);
    caught = err;
    return true;
  });
  return caught!;
}

async function stateOf(c: pg.Client): Promise<State> {
  const r = (await c.query(STATE_SQL)).rows[0] as State;
  return { cu: r.cu, su: r.su, pu: r.pu, n: r.n };
}

async function expectState(c: pg.Client, want: State, label: string): Promise<void> {
  assert.deepEqual(await stateOf(c), want, `identity changed after: ${label}`);
}

async function pinned(c: pg.Client): Promise<void> {
  // Session state: in transaction mode the client keeps its server connection from here on.
  await c.query('CREATE TEMP TABLE IF NOT EXISTS escape_pin (x int)');
}

// ------------------------------------------------------------------------------------ raw protocol

const M = {
  Q: (sql: string) => new MessageWriter().begin(0x51).cstring(sql).end().toBuffer(),
  P: (name: string, sql: string) => new MessageWriter().begin(0x50).cstring(name).cstring(sql).int16(0).end().toBuffer(),
  B: (stmt: string, params: string[] = [], portal = '') => {
    const w = new MessageWriter().begin(0x42).cstring(portal).cstring(stmt).int16(0).int16(params.length);
    for (const p of params) w.int32(Buffer.byteLength(p)).bytes(Buffer.from(p));
    return w.int16(0).end().toBuffer();
  },
  E: (portal = '') => new MessageWriter().begin(0x45).cstring(portal).int32(0).end().toBuffer(),
  D: (kind: 'S' | 'P', name: string) => new MessageWriter().begin(0x44).int8(kind.charCodeAt(0)).cstring(name).end().toBuffer(),
  C: (kind: 'S' | 'P', name: string) => new MessageWriter().begin(0x43).int8(kind.charCodeAt(0)).cstring(name).end().toBuffer(),
  S: () => new MessageWriter().begin(0x53).end().toBuffer(),
  /** FunctionCall (fast path): text arguments, text result. */
  F: (oid: number, args: string[]) => {
    const w = new MessageWriter().begin(0x46).int32(oid).int16(1).int16(0).int16(args.length);
    for (const a of args) w.int32(Buffer.byteLength(a)).bytes(Buffer.from(a));
    return w.int16(0).end().toBuffer();
  },
};

async function send(conn: RawConnection, ...messages: Buffer[]): Promise<BackendMessage[]> {
  conn.write(Buffer.concat(messages));
  return conn.until('Z', 10_000);
}

const types = (ms: BackendMessage[]) => ms.map((m) => m.type).join('');
const errorOf = (ms: BackendMessage[]): Record<string, string> | undefined => {
  const e = ms.find((m) => m.type === 'E');
  return e ? errorFields(e) : undefined;
};

function rowsOf(ms: BackendMessage[]): (string | null)[][] {
  return ms
    .filter((m) => m.type === 'D')
    .map((m) => {
      const n = m.bytes.readInt16BE(5);
      const out: (string | null)[] = [];
      let p = 7;
      for (let i = 0; i < n; i++) {
        const len = m.bytes.readInt32BE(p);
        p += 4;
        if (len < 0) out.push(null);
        else {
          out.push(m.bytes.toString('utf8', p, p + len));
          p += len;
        }
      }
      return out;
    });
}

async function rawState(conn: RawConnection): Promise<State> {
  const ms = await send(conn, M.Q(STATE_SQL));
  const err = errorOf(ms);
  if (err) throw Object.assign(new Error(`state query failed: ${err.C} ${err.M}`), { code: err.C });
  const [row] = rowsOf(ms);
  return { cu: row[0]!, su: row[1]!, pu: row[2], n: Number(row[3]) };
}

async function rawLoginAs(stack: Stack, user: keyof typeof TRUST_USERS | keyof typeof USERS): Promise<RawConnection> {
  return rawLogin(stack.port, { user, password: (USERS as Record<string, string>)[user] });
}

/** A simple query through the raw connection must succeed. */
async function rawOk(conn: RawConnection, sql: string): Promise<BackendMessage[]> {
  const ms = await send(conn, M.Q(sql));
  const err = errorOf(ms);
  assert.equal(err, undefined, `${sql}: ${err?.C} ${err?.M}`);
  return ms;
}

// ------------------------------------------------------------------------------------ statement forms

interface Form {
  sql: string;
  /** Accepted SQLSTATEs, default 42501. */
  codes?: readonly string[];
}

/** Every statement form that would change the identity, as SQL text (simple query protocol). */
const FORMS: Form[] = [
  // SET / RESET ROLE and SESSION AUTHORIZATION
  { sql: 'SET ROLE alice' },
  { sql: 'SET ROLE carol' },
  { sql: 'SET ROLE web_writer' },
  { sql: 'SET ROLE app_tier' },
  { sql: 'SET SESSION ROLE alice' },
  { sql: 'SET LOCAL ROLE alice' },
  { sql: 'RESET ROLE' },
  { sql: 'SET ROLE NONE' },
  { sql: 'SET role TO DEFAULT' },
  { sql: "SET \"role\" = 'alice'" },
  { sql: "SET \"ROLE\" TO 'alice'" },
  { sql: 'SET SESSION AUTHORIZATION alice' },
  { sql: 'SET SESSION AUTHORIZATION DEFAULT' },
  { sql: 'RESET SESSION AUTHORIZATION' },
  { sql: "SET session_authorization = 'alice'" },
  // comments and case
  { sql: 'SET/**/ROLE alice' },
  { sql: 'set -- c\n role alice' },
  { sql: '/* lead */ SET /* a /* nested */ b */ ROLE alice' },
  { sql: 'SET ROLE ALICE' },
  { sql: 'sEt RoLe "alice"' },
  { sql: 'RESET ROLE;' },
  // set_config in all spellings
  { sql: "SELECT set_config('role', 'alice', false)" },
  { sql: "SELECT pg_catalog.set_config('role', 'alice', false)" },
  { sql: "SELECT \"set_config\"('role', 'alice', false)" },
  { sql: "SELECT U&\"\\0073et_config\"('role', 'alice', false)" },
  { sql: "SELECT set_config(U&'\\0072ole', 'alice', false)" },
  { sql: "SELECT set_config(E'r\\x6fle', 'alice', false)" },
  { sql: "SELECT set_config($q$role$q$, 'alice', false)" },
  { sql: "SELECT set_config('ROLE', 'alice', false)" },
  { sql: "SELECT SET_CONFIG('Role', 'alice', FALSE)" },
  { sql: "SELECT set_config('session_authorization', 'alice', false)" },
  { sql: "SELECT set_config(setting_name => 'role', new_value => 'alice', is_local => false)" },
  { sql: "SELECT set_config(is_local => false, new_value => 'alice', setting_name => 'role')" },
  { sql: "SELECT set_config(lower('ROLE'), 'alice', false)" },
  { sql: "SELECT set_config('role'::text, 'alice', false)" },
  { sql: "SELECT set_config(n, 'alice', false) FROM (VALUES ('role')) AS v(n)" },
  { sql: "SELECT set_config('role', 'alice', true)" },
  // hidden in subqueries, CTEs, other statements
  { sql: "SELECT (SELECT set_config('role', 'alice', false))" },
  { sql: "WITH x AS (SELECT set_config('role', 'alice', false)) SELECT * FROM x" },
  { sql: "SELECT id FROM shop.orders WHERE set_config('role', 'alice', false) IS NOT NULL" },
  { sql: "EXPLAIN ANALYZE SELECT set_config('role', 'alice', false)" },
  { sql: "PREPARE esc_p AS SELECT set_config('role', 'alice', false)" },
  { sql: "CREATE TEMP TABLE esc_t (x text DEFAULT set_config('role', 'alice', false))" },
  { sql: "SELECT query_to_xml('SET ROLE alice', true, true, '')" },
  // multi-statement simple queries
  { sql: 'SELECT 1; SET ROLE alice' },
  { sql: 'SELECT 1; SET ROLE NONE' },
  { sql: "SELECT 1; SELECT set_config('role', 'alice', false); SELECT 2" },
  { sql: 'SELECT 1; DISCARD ALL' },
  // session resets while a proxy is in force
  { sql: 'DISCARD ALL' },
  { sql: 'discard all;' },
  { sql: 'RESET ALL' },
  // trustgate's own settings
  { sql: "SET trustgate.identity = 'x'" },
  { sql: "SET LOCAL trustgate.identity_mac = 'x'" },
  { sql: 'RESET trustgate.identity' },
  { sql: "SET \"TrustGate\".\"Identity\" = 'x'" },
  { sql: "SELECT set_config('trustgate.identity', '', false)" },
  { sql: "SELECT set_config('TRUSTGATE.IDENTITY_MAC', '', false)" },
  { sql: "SET trustgate.proxy_user = 'alice'" },
  // pg_settings
  { sql: "UPDATE pg_settings SET setting = 'alice' WHERE name = 'role'" },
  { sql: "UPDATE pg_catalog.pg_settings SET setting = '' WHERE name = 'trustgate.identity'" },
  { sql: "WITH u AS (UPDATE pg_settings SET setting = 'alice' WHERE name = 'role' RETURNING 1) SELECT * FROM u" },
  { sql: 'CREATE TEMP VIEW esc_v AS SELECT name, setting FROM pg_settings' },
  { sql: 'COPY pg_settings (name, setting) FROM STDIN' },
  // defaults and function SET clauses
  { sql: "ALTER ROLE app_tier SET role = 'alice'" },
  { sql: "ALTER ROLE app_tier IN DATABASE postgres SET role = 'alice'" },
  { sql: "ALTER DATABASE postgres SET role = 'alice'" },
  { sql: "ALTER DATABASE postgres SET trustgate.identity = 'x'" },
  { sql: "CREATE FUNCTION pg_temp.esc_f() RETURNS int LANGUAGE sql SET role = 'alice' AS 'SELECT 1'" },
  { sql: "CREATE FUNCTION pg_temp.esc_g() RETURNS text LANGUAGE sql AS $f$SELECT set_config('role', 'alice', false)$f$" },
  { sql: "ALTER FUNCTION public.hidden_set_role(text) SET role = 'alice'" },
  // DO blocks
  { sql: "DO $$BEGIN PERFORM set_config('role', 'alice', false); END$$" },
  { sql: "DO $$BEGIN EXECUTE 'SET ROLE alice'; END$$" },
  { sql: "DO $$BEGIN EXECUTE 'SELECT 1'; END$$" },
  { sql: 'DO $$BEGIN SET ROLE alice; END$$' },
  { sql: "DO $$DECLARE r text := set_config('role', 'alice', false); BEGIN END$$" },
  { sql: "DO $o$BEGIN DO $i$BEGIN PERFORM set_config('role', 'alice', false); END$i$; END$o$" },
  { sql: "DO $o$BEGIN EXECUTE $i$DO $x$BEGIN PERFORM set_config('role', 'alice', false); END$x$$i$; END$o$" },
  { sql: 'DO LANGUAGE sql $$SELECT 1$$' },
  // settings that make the server lex text differently from the gateway
  { sql: 'SET standard_conforming_strings = off' },
  { sql: "SET client_encoding = 'SJIS'" },
];

/** Identity changes through node-postgres's extended protocol (Parse/Bind/Execute). */
const EXTENDED: { label: string; query: pg.QueryConfig }[] = [
  { label: 'set_config($1, $2) bound role', query: { text: 'SELECT set_config($1, $2, false)', values: ['role', 'alice'] } },
  { label: "set_config('role', $1)", query: { text: "SELECT set_config('role', $1, false)", values: ['alice'] } },
  { label: 'set_config($1::text) upper-case', query: { text: 'SELECT set_config($1::text, $2::text, false)', values: ['ROLE', 'alice'] } },
  { label: 'set_config($1) trustgate.identity', query: { text: 'SELECT set_config($1, $2, false)', values: ['trustgate.identity', '{}'] } },
  { label: 'set_config named args with $1', query: { text: "SELECT pg_catalog.set_config(setting_name => $1, new_value => 'alice', is_local => false)", values: ['role'] } },
  { label: 'set_config in a subquery', query: { text: 'SELECT (SELECT set_config($1, $2, false))', values: ['role', 'alice'] } },
  { label: 'set_config behind a harmless column', query: { text: "SELECT $1::int AS x, set_config('role', 'alice', false)", values: [1] } },
  { label: 'UPDATE pg_settings with parameters', query: { text: 'UPDATE pg_settings SET setting = $1 WHERE name = $2', values: ['alice', 'role'] } },
  { label: 'named statement SET ROLE', query: { name: 'esc_named_setrole', text: 'SET ROLE alice' } },
  { label: 'named statement RESET ROLE', query: { name: 'esc_named_reset', text: 'RESET ROLE' } },
  { label: 'named statement DISCARD ALL', query: { name: 'esc_named_discard', text: 'DISCARD ALL' } },
  { label: 'named statement SET trustgate.identity', query: { name: 'esc_named_tg', text: "SET trustgate.identity = ''" } },
];

// ------------------------------------------------------------------------------------ stacks

interface World {
  stack: Stack;
  admin: pg.Client;
  /** trustgate.trust_key('app_tier') and ('other_tier'). */
  appKey: string;
  otherKey: string;
  /** OID of pg_catalog.set_config(text, text, boolean), for fast-path calls. */
  setConfigOid: number;
  /** Lines PostgreSQL wrote to its log. */
  serverLog: string[];
}

/**
 * A stack of its own for the enclosing describe: PostgreSQL with the trust world, trustgate in
 * `mode` with two server connections per pool, the story's rules plus one for other_tier.
 */
function world(mode: 'transaction' | 'session'): World {
  const w = { serverLog: [] as string[] } as World;
  before(async () => {
    const db = await preparePostgres({ log: (line) => w.serverLog.push(line) });
    await setupTrustWorld(db);
    await db.query(ESCAPE_SETUP_SQL);
    const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 2 } });
    w.stack = stackOf(db, gw, logs, true);
    w.admin = await client(w.stack, 'secadm');
    for (const grant of [...STORY_GRANTS, 'GRANT CONNECT THROUGH other_tier TO PERMANENT dave WITHOUT ROLE;']) {
      assert.equal((await w.admin.query(grant)).command, 'GRANT');
    }
    w.appKey = String((await w.admin.query("SELECT trustgate.trust_key('app_tier') AS k")).rows[0].k);
    w.otherKey = String((await w.admin.query("SELECT trustgate.trust_key('other_tier') AS k")).rows[0].k);
    assert.match(w.appKey, /^[0-9a-f]{64}$/);
    assert.notEqual(w.appKey, w.otherKey);
    const [row] = await db.query<{ oid: number }>("SELECT 'pg_catalog.set_config(text,text,boolean)'::regprocedure::oid::int AS oid");
    w.setConfigOid = Number(row.oid);
  });
  after(async () => {
    await w.admin?.end().catch(() => undefined);
    await w.stack?.stop();
  });
  return w;
}

/** One test with a stack of its own: for attempts that, when they succeed, damage pooled server connections. */
function isolated(mode: 'transaction' | 'session', name: string, fn: (w: World) => Promise<void>): void {
  describe(name, () => {
    const w = world(mode);
    it(name, T, () => fn(w));
  });
}

/** A fresh app_tier client with `band` in force, pinned to its server connection (temp table). */
async function proxyClient(w: World, band: string, state: State): Promise<pg.Client> {
  const c = await client(w.stack, 'app_tier');
  await pinned(c);
  assert.equal((await c.query(band)).command, 'SET');
  await expectState(c, state, band);
  return c;
}

async function withClient(w: World, band: string, state: State, fn: (c: pg.Client) => Promise<void>): Promise<void> {
  const c = await proxyClient(w, band, state);
  try {
    await fn(c);
  } finally {
    await c.end().catch(() => undefined);
  }
}

async function withRaw(w: World, user: 'app_tier' | 'app', fn: (conn: RawConnection) => Promise<void>): Promise<void> {
  const conn = await rawLoginAs(w.stack, user);
  try {
    await fn(conn);
  } finally {
    conn.destroy();
  }
}

const okOr = (codes: readonly string[]) => (e: PgErr) => assert.ok(codes.includes(String(e.code)), `${e.code}: ${e.message}`);

// ------------------------------------------------------------------------------------ suites

for (const mode of ['transaction', 'session'] as const) {
  describe(`trusted sessions: escape attempts (${mode} mode)`, () => {
    // -------------------------------------------------------------------- with a proxy in force

    describe('statement forms with a proxy in force', () => {
      const w = world(mode);

      for (const proxy of PROXIES) {
        describe(`proxy ${proxy.name}`, () => {
          let c: pg.Client;
          before(async () => {
            c = await client(w.stack, 'app_tier');
            assert.equal((await c.query(proxy.band)).command, 'SET');
            await expectState(c, proxy.state, 'SET QUERY_BAND');
          });
          after(async () => {
            await c?.end().catch(() => undefined);
          });

          for (const form of FORMS) {
            it(`refuses ${JSON.stringify(form.sql)}`, T, async () => {
              await refused(c.query(form.sql), form.codes ?? ['42501'], undefined, form.sql);
              await expectState(c, proxy.state, form.sql);
            });
          }

          for (const { label, query } of EXTENDED) {
            it(`refuses in the extended protocol: ${label}`, T, async () => {
              await refused(c.query(query), ['42501'], undefined, label);
              await expectState(c, proxy.state, label);
            });
          }

          it('runs nothing of a multi-statement text with a refused statement in it', T, async () => {
            const mark = `multi-${mode}-${proxy.state.pu}`;
            await refused(c.query(`INSERT INTO shop.escape_marks VALUES ('${mark}'); SET ROLE alice`), '42501');
            await refused(c.query(`INSERT INTO shop.escape_marks VALUES ('${mark}'); SELECT set_config('role', 'alice', false)`), '42501');
            await refused(c.query(`INSERT INTO shop.escape_marks VALUES ('${mark}'); DISCARD ALL`), '42501');
            const seen = await c.query('SELECT count(*)::int AS n FROM shop.escape_marks WHERE note = $1', [mark]);
            assert.equal(seen.rows[0].n, 0, 'the INSERT before the refused statement did not run');
            // Control: the same INSERT in a harmless text is visible.
            await c.query(`INSERT INTO shop.escape_marks VALUES ('${mark}-ok'); SELECT 1`);
            const ok = await c.query('SELECT count(*)::int AS n FROM shop.escape_marks WHERE note = $1', [`${mark}-ok`]);
            assert.equal(ok.rows[0].n, 1);
            await expectState(c, proxy.state, 'multi-statement');
          });

          it('aborts a transaction block on a refusal; ROLLBACK restores normal work', T, async () => {
            await c.query('BEGIN');
            await refused(c.query('SET ROLE alice'), '42501');
            await refused(c.query('SELECT 1'), '25P02');
            await c.query('ROLLBACK');
            await expectState(c, proxy.state, 'refusal in a transaction block');
            await c.query('BEGIN');
            assert.equal((await c.query(STATE_SQL)).rows[0].cu, proxy.state.cu);
            await refused(c.query("SELECT set_config('role', 'alice', true)"), '42501');
            await refused(c.query(STATE_SQL), '25P02');
            const end = await c.query('COMMIT');
            assert.equal(end.command, 'ROLLBACK', 'COMMIT of an aborted transaction rolls back');
            await expectState(c, proxy.state, 'COMMIT after refusal');
          });

          it('keeps the identity across a savepoint rolled back after a refusal', T, async () => {
            await c.query('BEGIN');
            await c.query('SAVEPOINT s');
            await refused(c.query('DISCARD ALL'), '42501');
            await c.query('ROLLBACK TO SAVEPOINT s');
            await expectState(c, proxy.state, 'ROLLBACK TO SAVEPOINT');
            await refused(c.query('RESET ROLE'), '42501');
            await c.query('ROLLBACK TO SAVEPOINT s');
            await expectState(c, proxy.state, 'second ROLLBACK TO SAVEPOINT');
            await c.query('COMMIT');
            await expectState(c, proxy.state, 'COMMIT');
          });

          it('keeps identity and band consistent when a savepoint holding a FOR TRANSACTION switch rolls back', T, async () => {
            await c.query('BEGIN');
            await c.query('SAVEPOINT s');
            assert.equal((await c.query(proxy.other.band)).command, 'SET');
            await expectState(c, proxy.other.state, 'FOR TRANSACTION band');
            await c.query('ROLLBACK TO SAVEPOINT s');
            // PostgreSQL undid the local switch; the gateway must not run on with a stale view.
            const s = await stateOf(c);
            assert.ok(
              (s.cu === proxy.other.state.cu && s.pu === proxy.other.state.pu) || (s.cu === proxy.state.cu && s.pu === proxy.state.pu),
              `current_user ${s.cu} and proxy_user ${s.pu} disagree after ROLLBACK TO SAVEPOINT`,
            );
            await refused(c.query('SET ROLE alice'), '42501');
            await c.query('ROLLBACK');
            await expectState(c, proxy.state, 'ROLLBACK after FOR TRANSACTION band');
          });

          it('checks every statement behind a FOR TRANSACTION band that leads a request', T, async () => {
            const lead = proxy.other.band;
            // Control: the statements behind the band run as the band's proxy, in one request.
            const ran = (await c.query(`${lead}; ${STATE_SQL}`)) as unknown as pg.QueryResult[];
            assert.ok(Array.isArray(ran), 'two results');
            assert.equal(ran[0].command, 'SET');
            assert.deepEqual({ ...ran[ran.length - 1].rows[0] }, { ...proxy.other.state });
            await expectState(c, proxy.state, 'after a band-led request');
            for (const rest of [
              'SET ROLE alice',
              'SET LOCAL ROLE carol',
              'RESET ROLE',
              'DISCARD ALL',
              'RESET ALL',
              "SELECT set_config('role', 'web_writer', true)",
              "SELECT set_config('trustgate.identity', '', true)",
              "SET LOCAL trustgate.identity_mac = ''",
              'SELECT 1; SET ROLE NONE',
              'COMMIT; SET ROLE alice',
              "DO $$BEGIN EXECUTE 'SET ROLE alice'; END$$",
              "UPDATE pg_settings SET setting = 'alice' WHERE name = 'role'",
            ]) {
              await refused(c.query(`${lead}; ${rest}`), '42501', undefined, rest);
              await expectState(c, proxy.state, `band-led ${rest}`);
            }
            await refused(c.query(`${lead}; ${lead}`), BAND_ERR, undefined, 'two bands');
            await refused(c.query(`${lead}; SELECT 1; ${proxy.band}`), [...BAND_ERR], undefined, 'band after band');
            await expectState(c, proxy.state, 'two bands');
          });

          it('keeps identity and band consistent when a band-led request ends or opens its transaction itself', T, async () => {
            const lead = proxy.other.band;
            // COMMIT inside the request ends the band's transaction: what follows runs as the session's proxy.
            const after = (await c.query(`${lead}; COMMIT; ${STATE_SQL}`)) as unknown as pg.QueryResult[];
            const s = after[after.length - 1].rows[0] as State;
            assert.ok(
              (s.cu === proxy.state.cu && s.pu === proxy.state.pu) || (s.cu === proxy.other.state.cu && s.pu === proxy.other.state.pu),
              `current_user ${s.cu} and proxy_user ${s.pu} disagree after COMMIT in a band-led request`,
            );
            await expectState(c, proxy.state, 'after COMMIT in a band-led request');
            // BEGIN inside the request keeps the band until the block ends.
            await c.query(`${lead}; BEGIN; SELECT 1`);
            await expectState(c, proxy.other.state, 'band-led BEGIN');
            await refused(c.query('SET ROLE alice'), '42501');
            await refused(c.query('SELECT 1'), '25P02');
            await c.query('ROLLBACK');
            await expectState(c, proxy.state, 'ROLLBACK after band-led BEGIN');
          });

          it('refuses a proxy change through SET QUERY_BAND in a multi-statement text (PostgreSQL syntax error)', T, async () => {
            await refused(c.query("SELECT 1; SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION"), ['42601']);
            await refused(c.query(`SELECT 1; ${proxy.other.band}`), ['42601']);
            await expectState(c, proxy.state, 'SET QUERY_BAND hidden in a multi-statement text');
          });
        });
      }
    });

    // -------------------------------------------------------------------- postgres.js

    describe('postgres.js (extended protocol, pipelined) with proxy carol', () => {
      const w = world(mode);
      let sql: postgres.Sql;
      const state = async (): Promise<State> => {
        const [r] = await sql.unsafe(STATE_SQL, [], { prepare: false });
        return { cu: r.cu, su: r.su, pu: r.pu, n: r.n };
      };
      before(async () => {
        sql = postgres(w.stack.url('app_tier'), { max: 1, onnotice: () => undefined, connect_timeout: 10 });
        await sql.unsafe(BAND_CAROL, [], { prepare: false });
        assert.deepEqual(await state(), CAROL);
      });
      after(async () => {
        await sql?.end({ timeout: 2 });
      });

      const cases: { label: string; run: () => Promise<unknown> }[] = [
        { label: "unsafe('SET ROLE alice') prepared", run: () => sql.unsafe('SET ROLE alice') },
        { label: "unsafe('RESET ROLE') unprepared", run: () => sql.unsafe('RESET ROLE', [], { prepare: false }) },
        { label: "unsafe(set_config('role')) unprepared", run: () => sql.unsafe("SELECT set_config('role', 'alice', false)", [], { prepare: false }) },
        { label: 'unsafe(set_config($1, $2)) with parameters', run: () => sql.unsafe('SELECT set_config($1, $2, false)', ['role', 'alice']) },
        { label: 'tagged set_config(${name}, ${value})', run: () => sql`SELECT set_config(${'role'}, ${'alice'}, false)` },
        { label: "tagged set_config('role', ${value})", run: () => sql`SELECT set_config('role', ${'alice'}, false)` },
        { label: 'tagged set_config(trustgate.identity)', run: () => sql`SELECT set_config('trustgate.identity', ${''}, false)` },
        { label: "unsafe('DISCARD ALL')", run: () => sql.unsafe('DISCARD ALL') },
        { label: "unsafe('RESET ALL')", run: () => sql.unsafe('RESET ALL') },
        { label: "unsafe('SET SESSION AUTHORIZATION alice')", run: () => sql.unsafe('SET SESSION AUTHORIZATION alice') },
        { label: 'unsafe(DO … EXECUTE)', run: () => sql.unsafe("DO $$BEGIN EXECUTE 'SET ROLE alice'; END$$") },
        { label: 'unsafe(UPDATE pg_settings)', run: () => sql.unsafe("UPDATE pg_settings SET setting = 'alice' WHERE name = 'role'") },
      ];
      for (const { label, run } of cases) {
        it(`refuses ${label}`, T, async () => {
          await refused(run(), '42501', undefined, label);
          assert.deepEqual(await state(), CAROL, label);
        });
      }

      it('refuses escapes pipelined behind and between harmless queries, and runs the harmless ones as the proxy', T, async () => {
        const results = await Promise.allSettled([
          sql`SELECT 1 AS one`,
          sql.unsafe('SET ROLE alice'),
          sql.unsafe(STATE_SQL),
          sql`SELECT set_config(${'role'}, ${'alice'}, false)`,
          sql`SELECT current_user AS cu, trustgate.proxy_user() AS pu`,
          sql.unsafe('DISCARD ALL'),
          sql.unsafe("SELECT set_config('trustgate.identity', '', false)", [], { prepare: false }),
          sql`SELECT count(*)::int AS n FROM shop.orders`,
          sql.unsafe('RESET ROLE'),
          sql`SELECT current_user AS cu, trustgate.proxy_user() AS pu`,
        ]);
        const codeAt = (i: number) => {
          const r = results[i];
          assert.equal(r.status, 'rejected', `query ${i} should have been refused`);
          return (r as PromiseRejectedResult).reason.code;
        };
        const valueAt = (i: number): Record<string, unknown> => {
          const r = results[i];
          assert.equal(r.status, 'fulfilled', `query ${i} failed: ${(r as PromiseRejectedResult).reason?.message}`);
          return { ...(r as PromiseFulfilledResult<postgres.RowList<postgres.Row[]>>).value[0] };
        };
        assert.deepEqual(valueAt(0), { one: 1 });
        assert.equal(codeAt(1), '42501');
        assert.deepEqual(valueAt(2), { ...CAROL });
        assert.equal(codeAt(3), '42501');
        assert.deepEqual(valueAt(4), { cu: 'web_reader', pu: 'carol' });
        assert.equal(codeAt(5), '42501');
        assert.equal(codeAt(6), '42501');
        assert.deepEqual(valueAt(7), { n: 1 });
        assert.equal(codeAt(8), '42501');
        assert.deepEqual(valueAt(9), { cu: 'web_reader', pu: 'carol' });
        assert.deepEqual(await state(), CAROL);
      });

      it('aborts sql.begin() on a refusal (25P02 after it) and leaves the identity', T, async () => {
        const codes: string[] = [];
        await Promise.allSettled([
          sql.begin(async (tx) => {
            await tx`SELECT 1`;
            await tx.unsafe('SET LOCAL ROLE alice').catch((e: PgErr) => codes.push(String(e.code)));
            await tx`SELECT current_user`.catch((e: PgErr) => codes.push(String(e.code)));
          }),
        ]);
        assert.deepEqual(codes, ['42501', '25P02']);
        await refused(
          sql.begin(async (tx) => {
            await tx`SELECT set_config('role', ${'alice'}, true)`;
          }),
          '42501',
        );
        assert.deepEqual(await state(), CAROL);
      });
    });

    // -------------------------------------------------------------------- without a proxy

    describe('without a proxy', () => {
      const w = world(mode);

      describe('the trusted user app_tier', () => {
        let c: pg.Client;
        before(async () => {
          c = await client(w.stack, 'app_tier');
          await expectState(c, PLAIN, 'login');
        });
        after(async () => {
          await c?.end().catch(() => undefined);
        });

        const plainForms = [
          'SET ROLE alice',
          'SET ROLE carol',
          'SET ROLE web_reader',
          'SET LOCAL ROLE web_writer',
          'RESET ROLE',
          'SET ROLE NONE',
          'SET SESSION AUTHORIZATION alice',
          "SELECT set_config('role', 'alice', false)",
          "SELECT set_config('session_authorization', 'alice', false)",
          "SELECT U&\"\\0073et_config\"('role', 'carol', false)",
          "DO $$BEGIN PERFORM set_config('role', 'alice', false); END$$",
          "DO $$BEGIN EXECUTE 'SELECT 1'; END$$",
          "ALTER ROLE app_tier SET role = 'alice'",
          "UPDATE pg_settings SET setting = 'alice' WHERE name = 'role'",
          "SET trustgate.identity = 'x'",
          "SELECT set_config('trustgate.identity_mac', 'x', false)",
          'SELECT 1; SET ROLE alice',
        ];
        for (const sqlText of plainForms) {
          it(`refuses ${JSON.stringify(sqlText)}`, T, async () => {
            await refused(c.query(sqlText), '42501', undefined, sqlText);
            await expectState(c, PLAIN, sqlText);
          });
        }

        it('checks the statements behind a leading FOR TRANSACTION band', T, async () => {
          const lead = "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION";
          for (const rest of ['SET ROLE carol', 'RESET ROLE', 'DISCARD ALL', "SELECT set_config('role', 'carol', true)", 'COMMIT; SET ROLE carol']) {
            await refused(c.query(`${lead}; ${rest}`), '42501', undefined, rest);
            await expectState(c, PLAIN, `band-led ${rest}`);
          }
          await refused(c.query(`${BAND_ALICE}; SELECT 1`), BAND_ERR);
          await expectState(c, PLAIN, 'FOR SESSION band leading a request');
        });

        it('refuses set_config with a bound setting name and a named SET ROLE (extended protocol)', T, async () => {
          await refused(c.query('SELECT set_config($1, $2, false)', ['role', 'alice']), '42501');
          await refused(c.query({ name: 'plain_setrole', text: 'SET ROLE alice' }), '42501');
          await expectState(c, PLAIN, 'extended');
        });

        it('allows DISCARD ALL and RESET ALL without a proxy (nothing to lose), identity unchanged', T, async () => {
          await c.query('DISCARD ALL');
          await expectState(c, PLAIN, 'DISCARD ALL');
          await c.query('RESET ALL');
          await expectState(c, PLAIN, 'RESET ALL');
          // And a proxy still works afterwards.
          await c.query(BAND_CAROL);
          await expectState(c, CAROL, 'band after DISCARD ALL');
          await c.query('SET QUERY_BAND = NONE FOR SESSION');
          await expectState(c, PLAIN, 'NONE');
        });
      });

      describe('a user without CONNECT THROUGH rules (app)', () => {
        let c: pg.Client;
        const who = async () => (await c.query('SELECT current_user AS cu, session_user AS su, trustgate.proxy_user() AS pu')).rows[0];
        before(async () => {
          c = await client(w.stack, 'app');
        });
        after(async () => {
          await c?.end().catch(() => undefined);
        });

        it('may SET ROLE to its own memberships and back, as in plain PostgreSQL', T, async () => {
          assert.equal((await c.query('SET ROLE app_helper')).command, 'SET');
          assert.deepEqual(await who(), { cu: 'app_helper', su: 'app', pu: null });
          await c.query('RESET ROLE');
          assert.deepEqual(await who(), { cu: 'app', su: 'app', pu: null });
          await c.query("SELECT set_config('role', 'app_helper', false)");
          assert.equal((await who()).cu, 'app_helper');
          await c.query('SET ROLE NONE');
          await c.query("DO $$BEGIN EXECUTE 'SET ROLE app_helper'; END$$");
          assert.equal((await who()).cu, 'app_helper');
          await c.query('RESET ROLE');
          assert.deepEqual(await who(), { cu: 'app', su: 'app', pu: null });
        });

        it('is bounded by PostgreSQL for roles it is not a member of', T, async () => {
          await refused(c.query('SET ROLE alice'), '42501', /permission denied to set role/);
          await refused(c.query('SET SESSION AUTHORIZATION alice'), '42501', /permission denied/);
          assert.deepEqual(await who(), { cu: 'app', su: 'app', pu: null });
        });

        for (const sqlText of [
          "SET trustgate.identity = '{}'",
          "SET LOCAL trustgate.identity_mac = 'x'",
          'RESET trustgate.identity',
          "SELECT set_config('trustgate.identity', '{}', false)",
          "SELECT pg_catalog.set_config('trustgate.identity_mac', 'x', false)",
          "UPDATE pg_settings SET setting = 'x' WHERE name = 'trustgate.identity'",
          "DO $$BEGIN PERFORM set_config('trustgate.identity', '{}', false); END$$",
        ]) {
          it(`refuses writing trustgate's settings: ${JSON.stringify(sqlText)}`, T, async () => {
            await refused(c.query(sqlText), '42501', undefined, sqlText);
            assert.deepEqual(await who(), { cu: 'app', su: 'app', pu: null });
          });
        }
      });

      describe('SET QUERY_BAND edge cases', () => {
        it('refuses SET QUERY_BAND as a named extended-protocol statement (0A000)', T, async () => {
          const c = await client(w.stack, 'app_tier');
          try {
            await refused(c.query({ name: 'qb_named', text: BAND_ALICE }), '0A000', /named statement/);
            await expectState(c, PLAIN, 'named SET QUERY_BAND');
          } finally {
            await c.end().catch(() => undefined);
          }
          await withRaw(w, 'app_tier', async (conn) => {
            const ms = await send(conn, M.P('qb_raw', BAND_ALICE), M.B('qb_raw'), M.E(), M.S());
            assert.equal(errorOf(ms)?.C, '0A000');
            assert.equal(types(ms), 'EZ');
            assert.deepEqual(await rawState(conn), PLAIN);
          });
        });

        it('refuses SET QUERY_BAND in the middle of an extended batch (0A000); the batch stops there', T, async () => {
          await withRaw(w, 'app_tier', async (conn) => {
            const ms = await send(conn, M.P('', 'SELECT 1'), M.B(''), M.E(), M.P('', BAND_ALICE), M.B(''), M.E(), M.P('', 'SELECT 2'), M.B(''), M.E(), M.S());
            assert.equal(errorOf(ms)?.C, '0A000', types(ms));
            assert.deepEqual(rowsOf(ms), [['1']], 'the statement before ran, the one after was skipped');
            assert.deepEqual(await rawState(conn), PLAIN);
            // First after Sync it is accepted.
            const ok = await send(conn, M.P('', BAND_ALICE), M.B(''), M.E(), M.S());
            assert.equal(errorOf(ok), undefined);
            assert.deepEqual(await rawState(conn), ALICE);
            await rawOk(conn, 'SET QUERY_BAND = NONE FOR SESSION');
            assert.deepEqual(await rawState(conn), PLAIN);
          });
        });

        it('refuses SET QUERY_BAND after a harmless statement in a simple query (PostgreSQL syntax error), nothing switched', T, async () => {
          const c = await client(w.stack, 'app_tier');
          try {
            await refused(c.query(`SELECT 1; ${BAND_ALICE}`), '42601');
            await refused(c.query(`INSERT INTO shop.escape_marks VALUES ('qb-multi'); ${BAND_ALICE}`), '42601');
            await refused(c.query(`${BAND_ALICE}; SELECT 1`), BAND_ERR);
            await refused(c.query(`${BAND_ALICE}; SET ROLE postgres`), BAND_ERR);
            await refused(c.query(`${BAND_ALICE} SET ROLE postgres`), BAND_ERR);
            assert.equal((await c.query("SELECT count(*)::int AS n FROM shop.escape_marks WHERE note = 'qb-multi'")).rows[0].n, 0);
            await expectState(c, PLAIN, 'multi-statement SET QUERY_BAND');
          } finally {
            await c.end().catch(() => undefined);
          }
        });

        it('refuses band injection through values built from end-user input', T, async () => {
          const c = await client(w.stack, 'app_tier');
          try {
            const build = (user: string, input: string) => `SET QUERY_BAND = 'ProxyUser=${user};x=${input};' FOR SESSION`;
            const cases: [string, string, readonly string[]][] = [
              ['alice', '1;ProxyUser=carol', ['22023']],
              ['alice', '1;proxyuser=carol', ['22023']],
              ['alice', "1';SET ROLE postgres;--", BAND_ERR],
              ['alice', "1' FOR SESSION; SET ROLE postgres; --", BAND_ERR],
              ['alice', "1' FOR TRANSACTION; SET ROLE postgres; --", [...BAND_ERR, '42501', '25P01']],
              ['alice', "O'Brien", BAND_ERR],
              ['alice', "'; RESET ROLE; SELECT '", BAND_ERR],
              ['alice', 'a=b', ['22023']],
              ['carol', '1;ProxyRole=web_writer', ['42501']],
              ['alice', '1;ProxyUser=dave', ['22023']],
            ];
            for (const [user, input, codes] of cases) {
              await refused(c.query(build(user, input)), codes, undefined, input);
              await expectState(c, PLAIN, `band injection ${input}`);
            }
            // Quoting tricks: the band parser reads them as PostgreSQL would, and refuses them.
            await refused(c.query("SET QUERY_BAND = 'ProxyUser=alice;'';SET ROLE postgres;--' FOR SESSION"), BAND_ERR);
            await refused(c.query("SET QUERY_BAND = E'ProxyUser=alice;\\' ; SET ROLE postgres; --' FOR SESSION"), BAND_ERR);
            await refused(c.query('SET QUERY_BAND = $$ProxyUser=alice;$$ FOR SESSION'), BAND_ERR);
            await expectState(c, PLAIN, 'quoting tricks');
          } finally {
            await c.end().catch(() => undefined);
          }
        });
      });

      if (mode === 'session') {
        describe('reserved statement names (session mode)', () => {
          it('refuses Parse and Close of tg_switch (42501) and keeps the switch working', T, async () => {
            await withRaw(w, 'app_tier', async (conn) => {
              await rawOk(conn, BAND_CAROL);
              assert.deepEqual(await rawState(conn), CAROL);
              for (const name of ['tg_switch', 'tg_switch_m', 'tg_anything']) {
                const p = await send(conn, M.P(name, 'SELECT 1'), M.S());
                assert.equal(errorOf(p)?.C, '42501', `Parse ${name}: ${types(p)}`);
                const cl = await send(conn, M.C('S', name), M.S());
                assert.equal(errorOf(cl)?.C, '42501', `Close ${name}: ${types(cl)}`);
              }
              assert.deepEqual(await rawState(conn), CAROL);
              await rawOk(conn, BAND_ALICE);
              assert.deepEqual(await rawState(conn), ALICE, 'the switch still works');
            });
          });

          it('refuses a node-postgres named statement called tg_switch', T, async () => {
            const c = await client(w.stack, 'app_tier');
            try {
              await c.query(BAND_CAROL);
              await refused(c.query({ name: 'tg_switch', text: "SELECT 'x'" }), '42501', /reserved/);
              await expectState(c, CAROL, 'named tg_switch');
              // Reserved in any case (names are case-sensitive in the protocol, but SQL folds them).
              await refused(c.query({ name: 'TG_switch', text: 'SELECT 1 AS one' }), '42501', /reserved/);
              assert.equal((await c.query({ name: 'my_switch', text: 'SELECT 1 AS one' })).rows[0].one, 1);
            } finally {
              await c.end().catch(() => undefined);
            }
          });
        });
      }
    });

    // -------------------------------------------------------------------- forging the identity

    describe('forging the identity settings (proxy carol)', () => {
      const w = world(mode);
      const forged = (pu: string, mac: string) =>
        `SELECT public.forge_identity(json_build_object('v', 1, 'pid', pg_backend_pid(), 'tu', 'app_tier', 'pu', '${pu}', 'pr', NULL, 'k', 'permanent', 'role', '${pu}', 'qb', 'ProxyUser=${pu};', 'tb', NULL, 'sb', 'ProxyUser=${pu};')::text, '${mac}')`;

      it('refuses set_config on the identity settings from SQL text', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await refused(c.query("SELECT set_config('trustgate.identity', '{\"pu\":\"alice\"}', false)"), '42501');
          await refused(c.query("SELECT set_config('trustgate.identity_mac', repeat('0', 64), false)"), '42501');
          await expectState(c, CAROL, 'set_config');
        }));

      it('makes proxy_user() raise 42501 on a token written by server-side code (in a transaction)', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await c.query('BEGIN');
          await c.query(forged('alice', 'ab'.repeat(32)));
          await refused(c.query('SELECT trustgate.proxy_user()'), '42501', /not set by trustgate/);
          await c.query('ROLLBACK');
          await expectState(c, CAROL, 'forged token rolled back');
        }));

      it('cannot fool RLS with a forged token outside a transaction; the next request is switched back', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await c.query(forged('alice', 'ab'.repeat(32)));
          await refused(c.query('SELECT count(*) FROM shop.orders'), '42501', /not set by trustgate/);
          await expectState(c, CAROL, 'after the forged token failed');
          await c.query(forged('alice', ''));
          await refused(c.query('SELECT trustgate.proxy_user()'), '42501');
          await expectState(c, CAROL, 'after an empty MAC');
        }));

      it('rejects a genuine token of another backend (pid check)', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await withClient(w, BAND_ALICE, ALICE, async (other) => {
            const tok = (await other.query("SELECT current_setting('trustgate.identity') AS t, current_setting('trustgate.identity_mac') AS m, pg_backend_pid() AS pid")).rows[0];
            const mine = (await c.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
            assert.notEqual(tok.pid, mine, 'both clients are pinned to their own backends');
            assert.equal(JSON.parse(tok.t).pu, 'alice');
            await c.query('BEGIN');
            await c.query('SELECT public.forge_identity($1, $2)', [tok.t, tok.m]);
            await refused(c.query('SELECT trustgate.proxy_user()'), '42501', /not set by trustgate/);
            await refused(c.query('SELECT 1'), '25P02');
            await c.query('ROLLBACK');
            await expectState(c, CAROL, 'replayed token');
          });
        }));

      it('bounds set_config(role) in server-side code by PostgreSQL membership (no membership → 42501)', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          for (const role of ['secadm', 'postgres', 'dave', 'trustgate_admin']) {
            await refused(c.query('SELECT public.hidden_set_role($1)', [role]), '42501', /permission denied to set role/, role);
            await expectState(c, CAROL, `hidden_set_role(${role})`);
          }
          await refused(c.query('SET ROLE postgres'), '42501');
          await expectState(c, CAROL, 'SET ROLE postgres');
        }));

      it('does not let server-side code erase the identity while the proxy role stays in force', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await c.query("SELECT public.forge_identity('', '')");
          // Secure outcomes: an error (then the gateway switches back), or the proxy still reported.
          const s = await stateOf(c).catch((e: PgErr) => {
            assert.equal(e.code, '42501');
            return null;
          });
          if (s) assert.deepEqual(s, CAROL, 'trustgate.proxy_user() must not read NULL while current_user is the proxy role');
          await expectState(c, CAROL, 'after an erased identity');
        }));
    });

    // -------------------------------------------------------------------- server-side code made by the proxy

    describe('server-side code created through the gateway by the proxy (proxy carol)', () => {
      const w = world(mode);

      /** Either the gateway refuses the creation (42501) or calling the object changes nothing. */
      const attempt = (create: string, call: string, band = BAND_CAROL, state = CAROL) =>
        withClient(w, band, state, async (c) => {
          const created = await c.query(create).then(
            () => true,
            (e: PgErr) => {
              assert.equal(e.code, '42501', `${create}: ${e.message}`);
              return false;
            },
          );
          if (created) await c.query(call).catch(() => undefined);
          const s = await stateOf(c).catch((e: PgErr) => ({ error: `${e.code} ${e.message}` }));
          assert.deepEqual(s, state, `${created ? 'created and called' : 'refused'}: ${create}`);
        });

      it('a pg_temp plpgsql function running SET ROLE through EXECUTE', T, () =>
        attempt("CREATE FUNCTION pg_temp.esc_exec() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SET ROLE alice'; END$$", 'SELECT pg_temp.esc_exec()'));

      it('a pg_temp function with an obfuscated EXECUTE (no suspicious word in its body)', T, () =>
        attempt(
          "CREATE FUNCTION pg_temp.esc_hex() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE convert_from(decode('53455420524f4c4520616c696365', 'hex'), 'UTF8'); END$$",
          'SELECT pg_temp.esc_hex()',
        ));

      it('a pg_temp function that erases trustgate.identity through EXECUTE', T, () =>
        attempt(
          "CREATE FUNCTION pg_temp.esc_erase() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SELECT set_config(''trustgate.identity'', '''', false)'; END$$",
          'SELECT pg_temp.esc_erase()',
        ));

      it('a pg_temp aggregate whose state function is set_config', T, () =>
        attempt("CREATE AGGREGATE pg_temp.esc_agg(text, boolean) (SFUNC = pg_catalog.set_config, STYPE = text, INITCOND = 'role')", "SELECT pg_temp.esc_agg('alice', false)"));

      it('a pg_temp procedure running RESET ROLE through EXECUTE', T, () =>
        attempt("CREATE PROCEDURE pg_temp.esc_proc() LANGUAGE plpgsql AS $$BEGIN EXECUTE 'RESET ROLE'; END$$", 'CALL pg_temp.esc_proc()'));

      it('the trusted user without a proxy: a pg_temp function running SET ROLE alice', T, () =>
        attempt(
          "CREATE FUNCTION pg_temp.esc_plain() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SET ROLE alice'; END$$",
          'SELECT pg_temp.esc_plain()',
          'SET QUERY_BAND = NONE FOR SESSION',
          PLAIN,
        ));
    });

    // -------------------------------------------------------------------- statements prepared before the proxy

    describe('statements prepared before the proxy and executed under it', () => {
      const w = world(mode);

      it('RESET ALL as a named statement (node-postgres reuses it with Bind/Execute only)', T, async () => {
        const c = await client(w.stack, 'app_tier');
        try {
          await pinned(c);
          // A named statement may run later under a proxy: for a trusted user it is checked as if
          // one were in force, so RESET ALL is refused already here.
          await refused(c.query({ name: 'pre_reset', text: 'RESET ALL' }), '42501');
          await c.query(BAND_CAROL);
          await expectState(c, CAROL, 'band');
          await c.query({ name: 'pre_reset', text: 'RESET ALL' }).catch(okOr(['42501']));
          await expectState(c, CAROL, 'RESET ALL prepared before the proxy');
        } finally {
          await c.end().catch(() => undefined);
        }
      });

      it('DISCARD ALL as a named statement parsed before SET QUERY_BAND (raw protocol)', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          // Refused at Parse: a named statement is checked as if a proxy were in force.
          assert.equal(types(await send(conn, M.P('pre_discard', 'DISCARD ALL'), M.S())), 'EZ');
          await rawOk(conn, BAND_CAROL);
          assert.deepEqual(await rawState(conn), CAROL);
          const ms = await send(conn, M.B('pre_discard'), M.E(), M.S());
          const err = errorOf(ms);
          // 26000: the statement was never prepared.
          if (err) assert.ok(['42501', '26000'].includes(String(err.C)), `${err.C} ${err.M}`);
          assert.deepEqual(await rawState(conn), CAROL, `DISCARD ALL prepared before the proxy (${types(ms)})`);
        }));

      it('DISCARD ALL as the unnamed statement, bound after SET QUERY_BAND (raw protocol)', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          await rawOk(conn, 'CREATE TEMP TABLE escape_pin (x int)');
          assert.equal(types(await send(conn, M.P('', 'DISCARD ALL'), M.S())), '1Z');
          await rawOk(conn, BAND_CAROL);
          const ms = await send(conn, M.B(''), M.E(), M.S());
          const err = errorOf(ms);
          // 25001: PostgreSQL refuses DISCARD ALL pipelined behind the gateway's switch.
          if (err) assert.ok(['42501', '26000', '25001'].includes(err.C), `${err.C} ${err.M}`);
          assert.deepEqual(await rawState(conn), CAROL, `unnamed DISCARD ALL bound under the proxy (${types(ms)})`);
        }));
    });

    // -------------------------------------------------------------------- the gateway's own switch statement

    describe("the gateway's switch statement (tg_switch) reached from SQL and the protocol", () => {
      const w = world(mode);

      it('EXECUTE tg_switch(…) with another role from SQL text', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await c.query("EXECUTE tg_switch('alice', '', '', 'false')").catch(okOr(['42501', '26000']));
          await expectState(c, CAROL, 'EXECUTE tg_switch');
        }));

      it('EXECUTE tg_switch(…) replaying the current token under another role', T, () =>
        withClient(w, BAND_CAROL, CAROL, async (c) => {
          await c
            .query("EXECUTE tg_switch('alice', current_setting('trustgate.identity'), current_setting('trustgate.identity_mac'), 'false')")
            .catch(okOr(['42501', '26000']));
          await refused(c.query('SELECT count(*) FROM shop.audit_notes'), '42501', /permission denied/, 'audit_notes is for auditors only');
          await expectState(c, CAROL, 'EXECUTE tg_switch with the current token');
        }));

      it('Bind of tg_switch by the client (raw protocol)', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          await rawOk(conn, 'CREATE TEMP TABLE escape_pin (x int)');
          await rawOk(conn, BAND_CAROL);
          assert.deepEqual(await rawState(conn), CAROL);
          const ms = await send(conn, M.B('tg_switch', ['alice', '', '', 'false']), M.E(), M.S());
          const err = errorOf(ms);
          assert.ok(err, `Bind of tg_switch was executed (${types(ms)})`);
          assert.ok(['42501', '26000'].includes(err.C), `${err.C} ${err.M}`);
          assert.deepEqual(await rawState(conn), CAROL);
        }));
    });

    isolated(mode, 'DEALLOCATE tg_switch neither bypasses nor breaks the next switch of the same client', async (w) => {
      await withClient(w, BAND_CAROL, CAROL, async (c) => {
        await c.query('DEALLOCATE tg_switch').catch(okOr(['42501', '26000']));
        await expectState(c, CAROL, 'after DEALLOCATE tg_switch');
        await c.query(BAND_ALICE);
        await expectState(c, ALICE, 'switch after DEALLOCATE tg_switch');
      });
    });

    isolated(mode, 'DEALLOCATE tg_switch does not break the pooled connection for the next clients', async (w) => {
      await withClient(w, BAND_CAROL, CAROL, async (c) => {
        await c.query('DEALLOCATE tg_switch').catch(okOr(['42501', '26000']));
      });
      await new Promise((r) => setTimeout(r, 100));
      // The server connection went back to the pool: other clients' switches must work on it.
      for (let i = 0; i < 3; i++) {
        const d = await client(w.stack, 'app_tier');
        try {
          await d.query(i % 2 === 0 ? BAND_CAROL : BAND_ALICE);
          await expectState(d, i % 2 === 0 ? CAROL : ALICE, `next client ${i}`);
        } finally {
          await d.end().catch(() => undefined);
        }
      }
    });

    isolated(mode, 'a client statement PREPAREd as tg_switch before the first switch is never run as the switch', async (w) => {
      const d = await client(w.stack, 'app_tier');
      try {
        await pinned(d);
        await d.query('PREPARE tg_switch(text, text, text, text) AS SELECT $1, $2, $3, $4').catch(okOr(['42501']));
        await d.query(BAND_CAROL);
        // The first request may fail (the switch could not be prepared); none may run as someone else.
        for (let i = 0; i < 3; i++) {
          const s = await stateOf(d).catch((e: PgErr) => ({ error: String(e.code) }));
          if ('error' in s) continue;
          assert.deepEqual(s, CAROL, `request ${i} after PREPARE tg_switch`);
        }
        await expectState(d, CAROL, 'after PREPARE tg_switch');
      } finally {
        await d.end().catch(() => undefined);
      }
    });

    // -------------------------------------------------------------------- fast-path function calls

    describe('fast-path FunctionCall messages', () => {
      const w = world(mode);

      it('cannot call set_config(role) with a proxy in force', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          await rawOk(conn, 'CREATE TEMP TABLE escape_pin (x int)');
          await rawOk(conn, BAND_CAROL);
          assert.deepEqual(await rawState(conn), CAROL);
          const ms = await send(conn, M.F(w.setConfigOid, ['role', 'alice', 'false']));
          const err = errorOf(ms);
          if (err) assert.equal(err.C, '42501', err.M);
          assert.deepEqual(await rawState(conn), CAROL, `FunctionCall set_config('role', 'alice') answered ${types(ms)}`);
        }));

      it('cannot call set_config(trustgate.identity)', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          await rawOk(conn, 'CREATE TEMP TABLE escape_pin (x int)');
          await rawOk(conn, BAND_CAROL);
          const ms = await send(conn, M.F(w.setConfigOid, ['trustgate.identity', '', 'false']));
          assert.equal(errorOf(ms)?.C, '42501', `FunctionCall set_config('trustgate.identity') answered ${types(ms)}`);
          assert.deepEqual(await rawState(conn), CAROL);
        }));

      it('cannot become a proxy without a band (trusted user alone)', T, () =>
        withRaw(w, 'app_tier', async (conn) => {
          await rawOk(conn, 'CREATE TEMP TABLE escape_pin (x int)');
          const ms = await send(conn, M.F(w.setConfigOid, ['role', 'alice', 'false']));
          const err = errorOf(ms);
          if (err) assert.equal(err.C, '42501', err.M);
          assert.deepEqual(await rawState(conn), PLAIN, `FunctionCall set_config('role', 'alice') answered ${types(ms)}`);
        }));
    });

    // -------------------------------------------------------------------- leaks to the next client

    isolated(mode, 'an identity change that slipped through (fast path) does not reach the next client of the pool', async (w) => {
      await withRaw(w, 'app_tier', async (conn) => {
        await rawOk(conn, BAND_CAROL);
        assert.deepEqual(await rawState(conn), CAROL);
        await send(conn, M.F(w.setConfigOid, ['role', 'alice', 'false']));
      });
      await new Promise((r) => setTimeout(r, 100));
      const b = await client(w.stack, 'app_tier');
      try {
        await b.query(BAND_CAROL);
        for (let i = 0; i < 4; i++) await expectState(b, CAROL, `request ${i} of the next client`);
        await refused(b.query('SELECT count(*) FROM shop.audit_notes'), '42501', /permission denied/);
      } finally {
        await b.end().catch(() => undefined);
      }
    });

    isolated(mode, 'an identity change that slipped through (EXECUTE tg_switch) does not reach the next client of the pool', async (w) => {
      const a = await client(w.stack, 'app_tier');
      try {
        await a.query(BAND_CAROL);
        await expectState(a, CAROL, 'band');
        await a
          .query("EXECUTE tg_switch('alice', current_setting('trustgate.identity'), current_setting('trustgate.identity_mac'), 'false')")
          .catch(okOr(['42501', '26000']));
      } finally {
        await a.end().catch(() => undefined);
      }
      await new Promise((r) => setTimeout(r, 100));
      const b = await client(w.stack, 'app_tier');
      try {
        await b.query(BAND_CAROL);
        for (let i = 0; i < 4; i++) await expectState(b, CAROL, `request ${i} of the next client`);
        await refused(b.query('SELECT count(*) FROM shop.audit_notes'), '42501', /permission denied/);
      } finally {
        await b.end().catch(() => undefined);
      }
    });

    // -------------------------------------------------------------------- trusted requests

    describe('trusted requests under WITH TRUST ONLY', () => {
      const w = world(mode);
      let c: pg.Client;
      const mark = (key: string, rest: string) => `/*trustgate:trusted=${key}*/ ${rest}`;
      before(async () => {
        assert.equal((await w.admin.query('GRANT CONNECT THROUGH app_tier WITH TRUST ONLY')).command, 'GRANT');
        c = await client(w.stack, 'app_tier');
        await expectState(c, PLAIN, 'login');
      });
      after(async () => {
        await c?.end().catch(() => undefined);
      });

      it('accepts the right key and refuses unmarked proxy changes', T, async () => {
        await refused(c.query(BAND_ALICE), '42501', /trusted requests/);
        await c.query(mark(w.appKey, BAND_ALICE));
        await expectState(c, ALICE, 'marked band');
        await refused(c.query('SET QUERY_BAND = NONE FOR SESSION'), '42501', /trusted requests/);
        await refused(c.query(BAND_CAROL), '42501', /trusted requests/);
        await expectState(c, ALICE, 'unmarked changes refused');
        await c.query(mark(w.appKey, 'SET QUERY_BAND = NONE FOR SESSION'));
        await expectState(c, PLAIN, 'marked NONE');
      });

      const badKeys: [string, () => string][] = [
        ['zeros', () => '0'.repeat(64)],
        ["other_tier's key", () => w.otherKey],
        ['an empty key', () => ''],
        ['a truncated key', () => w.appKey.slice(0, 63)],
        ['the key in upper case', () => w.appKey.toUpperCase()],
        ['the key with a suffix', () => `${w.appKey}0`],
        ['the key after a nested comment', () => `/* */${w.appKey}`],
      ];
      for (const [label, key] of badKeys) {
        it(`refuses a marking with ${label} (42501 invalid trusted-request marking)`, T, async () => {
          await refused(c.query(mark(key(), BAND_ALICE)), '42501', /invalid trusted-request marking/);
          await expectState(c, PLAIN, label);
        });
      }

      it("refuses app_tier's key on another trusted user's session; that user's own key works", T, async () => {
        const o = await client(w.stack, 'other_tier');
        try {
          await refused(o.query(mark(w.appKey, "SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION")), '42501', /invalid trusted-request marking/);
          const who = async () => (await o.query('SELECT current_user AS cu, trustgate.proxy_user() AS pu')).rows[0];
          assert.deepEqual(await who(), { cu: 'other_tier', pu: null });
          await refused(o.query(mark(w.otherKey, BAND_ALICE)), '42501', /no CONNECT THROUGH rule/);
          await o.query(mark(w.otherKey, "SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION"));
          assert.deepEqual(await who(), { cu: 'dave', pu: 'dave' });
          await refused(o.query('SET ROLE alice'), '42501');
          assert.deepEqual(await who(), { cu: 'dave', pu: 'dave' });
        } finally {
          await o.end().catch(() => undefined);
        }
      });

      it('does not count a marking that is not at the start of the request', T, async () => {
        await refused(c.query(`SELECT 1; ${mark(w.appKey, BAND_ALICE)}`), ['42601', '42501', '0A000']);
        await expectState(c, PLAIN, 'marking after SELECT 1');
        await refused(c.query(`/* first */ ${mark(w.appKey, BAND_ALICE)}`), '42501', /must start the request/);
        await refused(c.query(`-- first\n${mark(w.appKey, BAND_ALICE)}`), '42501', /must start the request/);
        await expectState(c, PLAIN, 'marking after a comment');
      });

      it('accepts a marking only on SET QUERY_BAND (0A000 otherwise)', T, async () => {
        await refused(c.query(mark(w.appKey, 'SELECT 1')), '0A000', /only accepted on SET QUERY_BAND/);
        await refused(c.query(mark(w.appKey, 'SET ROLE alice')), ['0A000', '42501']);
        await refused(c.query(mark(w.appKey, `SELECT 1; ${BAND_ALICE}`)), ['0A000', '42601']);
        await refused(c.query(mark(w.appKey, 'GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE')), '0A000');
        await expectState(c, PLAIN, 'marking on other statements');
      });

      it('refuses statements smuggled behind a marked band', T, async () => {
        await refused(c.query(mark(w.appKey, "SET QUERY_BAND = 'ProxyUser=alice;x=1' FOR SESSION; SET ROLE postgres; --;' FOR SESSION")), BAND_ERR);
        await refused(c.query(mark(w.appKey, "SET QUERY_BAND = 'ProxyUser=alice;x=1;ProxyUser=carol;' FOR SESSION")), '22023');
        await refused(c.query(mark(w.appKey, `${BAND_ALICE}; SET ROLE carol`)), BAND_ERR);
        await refused(c.query(mark(w.appKey, "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; SET ROLE carol")), '42501');
        await refused(c.query(mark(w.appKey, "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; DISCARD ALL")), '42501');
        await expectState(c, PLAIN, 'smuggled statements');
      });

      it('refuses a marked band as a named statement, accepts it unnamed in the extended protocol', T, async () => {
        await refused(c.query({ name: 'qb_marked', text: mark(w.appKey, BAND_ALICE) }), '0A000');
        await expectState(c, PLAIN, 'named marked band');
        await withRaw(w, 'app_tier', async (conn) => {
          const bad = await send(conn, M.P('', mark('f'.repeat(64), BAND_ALICE)), M.B(''), M.E(), M.S());
          assert.equal(errorOf(bad)?.C, '42501');
          const ok = await send(conn, M.P('', mark(w.appKey, BAND_ALICE)), M.B(''), M.E(), M.S());
          assert.equal(errorOf(ok), undefined, JSON.stringify(errorOf(ok)));
          assert.deepEqual(await rawState(conn), ALICE);
          await rawOk(conn, mark(w.appKey, 'SET QUERY_BAND = NONE FOR SESSION'));
          assert.deepEqual(await rawState(conn), PLAIN);
        });
      });

      it('never logs a trust key of a marking it handled (gateway log and server log)', T, async () => {
        assert.ok(w.stack.logs.length > 0);
        const gatewayLog = JSON.stringify(w.stack.logs);
        for (const key of [w.appKey, w.otherKey]) {
          assert.ok(!gatewayLog.includes(key), 'a trust key is in the gateway log');
          assert.ok(!gatewayLog.includes(key.toUpperCase()), 'a trust key is in the gateway log (upper case)');
        }
        // Markings the gateway handled (stripped or refused) never reach PostgreSQL. (Misplaced
        // markings the gateway forwards are the next test.)
        const handled = w.serverLog.filter((l) => l.includes(w.appKey) && !l.includes(`SELECT 1; /*trustgate:trusted=${w.appKey}`));
        assert.deepEqual(handled, [], 'a trust key reached the PostgreSQL log');
      });

      it('does not forward a misplaced marking (with its key) to PostgreSQL', T, async () => {
        const before = w.serverLog.length;
        await refused(c.query(`SELECT 1; ${mark(w.appKey, BAND_ALICE)}`), ['42601', '42501', '0A000']);
        await expectState(c, PLAIN, 'misplaced marking');
        await new Promise((r) => setTimeout(r, 200)); // the server log is read asynchronously
        const leaked = w.serverLog.slice(before).filter((l) => l.includes(w.appKey));
        assert.deepEqual(leaked, [], 'the trust key of a misplaced marking reached the PostgreSQL log');
      });
    });
  });
}
