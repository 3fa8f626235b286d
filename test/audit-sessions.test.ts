/**
 * The query log and the access log of trusted sessions, end to end (issue 4, first done-when
 * line): through a real gateway in both pool modes, with node-postgres (simple and extended
 * protocol) and psql, every request of a permanent and an application proxy user is in
 * `trustgate.query_log` exactly once with the right trusted user, proxy user, role and band;
 * refused switches, tamper attempts, untrusted requests under TRUST ONLY, GRANT/REVOKE CONNECT
 * THROUGH and PostgreSQL's own 42501 refusals are in `trustgate.access_log`; one SQL query answers
 * "what did end user alice do, through which middle tier, under which role, what was refused";
 * creators of objects follow the seed; a burst of requests is not held up by the log writer.
 *
 * One PostgreSQL for the file; each pool mode has its own gateway and audit instance name, and
 * every assertion reads only that instance's rows. All waits for log rows are bounded polls.
 *
 * Decisions asserted here:
 * - a request is a simple Query, or an extended-protocol batch up to its Sync; a SET QUERY_BAND
 *   the gateway answers is a request of its own, of statement_kind 'SET QUERY_BAND' (also when it
 *   leads a multi-statement request), recorded under the identity the band set (NONE: no proxy);
 * - proxy_role is the ProxyRole of the band, or, when the band names none, the role the
 *   connection runs as (e.g. 'alice' for a WITHOUT ROLE rule, 'web_reader' for carol's rule);
 * - a refused switch is logged with the proxy user and role the band asked for;
 * - the trust key of a trusted request never reaches the logs (the marking is redacted).
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { preparePostgres, startGateway, stackOf, USERS, type Stack } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';
import { setupTrustWorld, STORY_GRANTS, TRUST_USERS } from './helpers/trust.js';
import { run } from './helpers/psql.js';
import { withProxy } from '../src/index.js';

const MODES = ['transaction', 'session'] as const;
type Mode = (typeof MODES)[number];

const AUDITOR = { user: 'sec_auditor', password: 'sec-auditor-pw' };
Object.assign(USERS as Record<string, string>, { [AUDITOR.user]: AUDITOR.password });

let db: EmbeddedPostgres;
/** A superuser connection straight to PostgreSQL (reads the logs). */
let sup: pg.Client;
let tmp: string;

before(async () => {
  db = await preparePostgres();
  await setupTrustWorld(db);
  await db.query(`
    CREATE TABLE shop.secrets (s text);                 -- no privileges for anyone but its owner
    INSERT INTO shop.secrets VALUES ('nobody reads this');
    GRANT CREATE ON SCHEMA public TO app_tier, web_writer;
    GRANT trustgate_auditor TO ${AUDITOR.user};                 -- the login exists (USERS)
  `);
  sup = new pg.Client(db.connectionConfig());
  await sup.connect();
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-audit-sessions-'));
});
after(async () => {
  await sup?.end().catch(() => undefined);
  await db?.stop();
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `read` until `done` holds (flushing the gateway's audit log first), at most `ms`. */
async function poll<T>(stack: Stack, read: () => Promise<T>, done: (v: T) => boolean, what: string, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    await stack.gw.audit.flush();
    const v = await read();
    if (done(v)) return v;
    if (Date.now() > deadline) assert.fail(`timed out after ${ms} ms waiting for ${what}; last read:\n${JSON.stringify(v, null, 1)}`);
    await sleep(25);
  }
}

async function rows<T = Row>(sql: string, params: unknown[] = []): Promise<T[]> {
  return (await sup.query(sql, params)).rows as T[];
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Row = Record<string, any>;

const QUERY_COLUMNS = `log_id::text, client_addr, client_session, database, trusted_user, proxy_user, proxy_role, proxy_kind,
  query_band, transaction_band, session_band, statement_text, statement_kind, rows::int, sqlstate, result,
  bytes_in::int, bytes_out::int, pool_mode, trusted_request, started_at, ended_at, duration_ms`;
const ACCESS_COLUMNS = `log_id::text, client_addr, client_session, database, trusted_user, proxy_user, proxy_role, query_band,
  event, decision, rule, sqlstate, message, statement_text`;

/** A client of the gateway with its address as the gateway sees it. */
interface Conn {
  c: pg.Client;
  addr: string;
}

async function connect(stack: Stack, user: string): Promise<Conn> {
  const c = new pg.Client(stack.clientConfig(user));
  c.on('error', () => undefined);
  await c.connect();
  return { c, addr: `127.0.0.1:${(c as unknown as { connection: { stream: { localPort: number } } }).connection.stream.localPort}` };
}

const ext = (text: string, values: unknown[] = []) => ({ text, values, queryMode: 'extended' }) as pg.QueryConfig;

/** The identity a request is logged under. */
interface Id {
  proxy_user: string | null;
  proxy_role: string | null;
  proxy_kind: string | null;
  query_band: string | null;
  transaction_band: string | null;
  session_band: string | null;
}
const NO_PROXY: Id = { proxy_user: null, proxy_role: null, proxy_kind: null, query_band: null, transaction_band: null, session_band: null };

interface Expected extends Id {
  statement_text: string;
  statement_kind: string | null;
  rows: number | null;
  sqlstate: string | null;
  result: string;
  trusted_request: boolean;
}

/**
 * Runs requests on one client and remembers, for each, the query-log row it must produce (in
 * order). `id` is the identity requests are logged under until changed.
 */
class Requests {
  readonly expected: Expected[] = [];
  id: Id = NO_PROXY;
  session = '';

  constructor(
    readonly conn: Conn,
    private readonly stack: Stack,
    private readonly instance: string,
  ) {}

  /** The first request: a unique text by which the client's session id is found. */
  async start(marker: string): Promise<void> {
    await this.run(`SELECT '${marker}' AS marker`, { statement_kind: 'SELECT', rows: 1 });
    const found = await poll(
      this.stack,
      () => rows('SELECT client_session, client_addr FROM trustgate.query_log WHERE instance = $1 AND statement_text = $2', [this.instance, `SELECT '${marker}' AS marker`]),
      (r) => r.length > 0,
      `the marker request ${marker}`,
    );
    assert.equal(found.length, 1);
    assert.equal(found[0].client_addr, this.conn.addr);
    this.session = String(found[0].client_session);
  }

  async run(q: string | pg.QueryConfig, e: Partial<Expected> = {}, id: Id = this.id): Promise<pg.QueryResult & Error & { code?: string }> {
    const text = typeof q === 'string' ? q : q.text;
    let res: any;
    try {
      res = await this.conn.c.query(q as any);
      assert.equal(e.sqlstate ?? null, null, `expected ${e.sqlstate} from ${text}`);
    } catch (err) {
      if (!e.sqlstate) throw err;
      assert.equal((err as { code?: string }).code, e.sqlstate, `${text}: ${(err as Error).message}`);
      res = err;
    }
    this.expected.push({
      ...id,
      statement_text: text,
      statement_kind: null,
      rows: null,
      sqlstate: null,
      result: e.sqlstate ? 'error' : 'ok',
      trusted_request: false,
      ...e,
    });
    return res;
  }

  /** A SET QUERY_BAND the gateway answers: logged under the identity it sets. */
  async band(q: string | pg.QueryConfig, id: Id, e: Partial<Expected> = {}): Promise<void> {
    this.id = id;
    await this.run(q, { statement_kind: 'SET QUERY_BAND', ...e }, id);
  }

  /** Waits for this client's rows and checks them against the expectations, one for one. */
  async check(mode: Mode, trustedUser = 'app_tier'): Promise<Row[]> {
    const want = this.expected.length;
    const got = await poll(
      this.stack,
      () => rows(`SELECT ${QUERY_COLUMNS} FROM trustgate.query_log WHERE instance = $1 AND client_session = $2 ORDER BY log_id`, [this.instance, this.session]),
      (r) => r.length >= want,
      `${want} query-log rows of ${this.session}`,
    );
    // Nothing more arrives later (no duplicates, no stray rows).
    await sleep(100);
    await this.stack.gw.audit.flush();
    const all = await rows(`SELECT ${QUERY_COLUMNS} FROM trustgate.query_log WHERE instance = $1 AND client_session = $2 ORDER BY log_id`, [this.instance, this.session]);
    const dump = () => '\n' + all.map((r) => `${r.statement_kind} | ${r.proxy_user}/${r.proxy_role} | ${r.query_band} | ${r.result} ${r.sqlstate} | ${r.statement_text}`).join('\n');
    assert.equal(all.length, want, `N requests sent → N rows: ${want} sent, ${all.length} logged${dump()}`);
    assert.equal(got.length, want);
    all.forEach((r, i) => {
      const e = this.expected[i];
      const actual = Object.fromEntries(Object.keys(e).map((k) => [k, r[k]]));
      assert.deepEqual(actual, { ...e }, `request ${i + 1} of ${want} (${e.statement_text})${dump()}`);
      assert.equal(r.trusted_user, trustedUser);
      assert.equal(r.client_addr, this.conn.addr);
      assert.equal(r.database, 'postgres');
      assert.equal(r.pool_mode, mode);
      assert.ok(r.bytes_in > 0 && r.bytes_out > 0, `bytes of ${e.statement_text}: ${r.bytes_in}/${r.bytes_out}`);
      assert.ok(r.started_at <= r.ended_at && r.duration_ms >= 0, `times of ${e.statement_text}`);
    });
    return all;
  }
}

function alice(band: string, scope: 'transaction' | 'session', sessionBand: string | null = null, role = 'alice'): Id {
  const query_band = scope === 'transaction' ? band + (sessionBand ?? '') : band;
  return {
    proxy_user: 'alice',
    proxy_role: role,
    proxy_kind: 'permanent',
    query_band,
    transaction_band: scope === 'transaction' ? band : null,
    session_band: scope === 'session' ? band : sessionBand,
  };
}

async function accessRows(instance: string, session: string): Promise<Row[]> {
  return rows(`SELECT ${ACCESS_COLUMNS} FROM trustgate.access_log WHERE instance = $1 AND client_session = $2 ORDER BY log_id`, [instance, session]);
}

for (const mode of MODES) {
  describe(`audit of trusted sessions (${mode} mode)`, () => {
    const instance = `audit-sessions-${mode}`;
    let stack: Stack;
    let admin: Conn;

    before(async () => {
      const { gw, logs } = await startGateway(db, {
        pool: { mode, default_size: 8 },
        audit: { enabled: true, instance, flush_interval_ms: 20, spool_dir: path.join(tmp, instance) },
      });
      stack = stackOf(db, gw, logs, false);
      admin = await connect(stack, 'secadm');
      for (const grant of STORY_GRANTS) assert.equal((await admin.c.query(grant)).command, 'GRANT');
    });
    after(async () => {
      await admin?.c.end().catch(() => undefined);
      await stack?.stop();
    });

    it('logs every request of a permanent proxy user once (FOR TRANSACTION and FOR SESSION, simple and extended protocol)', async () => {
      const r = new Requests(await connect(stack, 'app_tier'), stack, instance);
      try {
        await r.start(`permanent-${mode}`);
        // FOR TRANSACTION, simple protocol.
        await r.run('BEGIN', { statement_kind: 'BEGIN' });
        const tx42 = alice('ProxyUser=alice;order=42;', 'transaction');
        await r.band("SET QUERY_BAND = 'ProxyUser=alice;order=42;' FOR TRANSACTION", tx42);
        const orders = await r.run('SELECT id FROM shop.orders ORDER BY id', { statement_kind: 'SELECT', rows: 2 });
        assert.deepEqual(orders.rows, [{ id: 1 }, { id: 5 }]);
        await r.run(ext('SELECT id FROM shop.orders WHERE id = $1', [5]), { statement_kind: 'SELECT', rows: 1 });
        await r.run('COMMIT', { statement_kind: 'COMMIT' }); // still alice's transaction
        r.id = NO_PROXY;
        const who = await r.run(ext('SELECT current_user AS cu'), { statement_kind: 'SELECT', rows: 1 });
        assert.deepEqual(who.rows, [{ cu: 'app_tier' }]);
        // FOR TRANSACTION, extended protocol (the band as the unnamed statement, first in its batch).
        await r.run(ext('BEGIN'), { statement_kind: 'BEGIN' });
        await r.band(ext("SET QUERY_BAND = 'ProxyUser=alice;order=43;' FOR TRANSACTION"), alice('ProxyUser=alice;order=43;', 'transaction'));
        const inTx = await r.run(ext('SELECT current_user AS cu, $1::text AS v', ['x']), { statement_kind: 'SELECT', rows: 1 });
        assert.deepEqual(inTx.rows, [{ cu: 'alice', v: 'x' }]);
        await r.run(ext('ROLLBACK'), { statement_kind: 'ROLLBACK' });
        r.id = NO_PROXY;
        // A band-led request (one simple query, one round trip): one request, one row.
        const led = "SET QUERY_BAND = 'ProxyUser=alice;req=7;' FOR TRANSACTION; SELECT id FROM shop.orders ORDER BY id";
        await r.run(led, { statement_kind: 'SET QUERY_BAND', rows: 2 }, alice('ProxyUser=alice;req=7;', 'transaction'));
        // FOR SESSION, simple and extended.
        const s1 = alice('ProxyUser=alice;app=shop;', 'session');
        await r.band("SET QUERY_BAND = 'ProxyUser=alice;app=shop;' FOR SESSION", s1);
        const n = await r.run(ext('SELECT count(*)::int AS n FROM shop.orders'), { statement_kind: 'SELECT', rows: 1 });
        assert.deepEqual(n.rows, [{ n: 2 }]);
        await r.run('SELECT * FROM shop.secrets', { sqlstate: '42501' });
        await r.run('BEGIN', { statement_kind: 'BEGIN' });
        const step = alice('step=2;', 'transaction', 'ProxyUser=alice;app=shop;');
        await r.band("SET QUERY_BAND = 'step=2;' FOR TRANSACTION", step);
        const qb = await r.run(ext("SELECT trustgate.query_band() AS qb, trustgate.query_band_value('step') AS step"), { statement_kind: 'SELECT', rows: 1 });
        assert.deepEqual(qb.rows, [{ qb: 'step=2;ProxyUser=alice;app=shop;', step: '2' }]);
        await r.run('COMMIT', { statement_kind: 'COMMIT' });
        r.id = s1;
        await r.band(ext("SET QUERY_BAND = 'page=2;' UPDATE FOR SESSION"), alice('ProxyUser=alice;app=shop;page=2;', 'session'));
        await r.run(ext('SELECT $1::int + 1 AS v', [1]), { statement_kind: 'SELECT', rows: 1 });
        await r.run('SELECT no_such_column FROM shop.orders', { sqlstate: '42703' });
        await r.band('SET QUERY_BAND = NONE FOR SESSION', NO_PROXY);
        await r.run(ext('SELECT 1 AS one'), { statement_kind: 'SELECT', rows: 1 });
        await r.check(mode);
      } finally {
        await r.conn.c.end();
      }
    });

    it('logs every request of an application proxy user once (FOR SESSION and FOR TRANSACTION, simple and extended protocol)', async () => {
      const r = new Requests(await connect(stack, 'app_tier'), stack, instance);
      const bob = (role: string, band: string, tb: string | null = null, sb: string | null = band): Id => ({
        proxy_user: 'bob_from_web',
        proxy_role: role,
        proxy_kind: 'application',
        query_band: band,
        transaction_band: tb,
        session_band: sb,
      });
      try {
        await r.start(`application-${mode}`);
        const reader = bob('web_reader', 'ProxyUser=bob_from_web;ProxyRole=web_reader;');
        await r.band("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION", reader);
        const mine = await r.run('SELECT id FROM shop.orders', { statement_kind: 'SELECT', rows: 1 });
        assert.deepEqual(mine.rows, [{ id: 3 }]);
        await r.run(ext('SELECT id FROM shop.orders WHERE owner = $1', ['bob_from_web']), { statement_kind: 'SELECT', rows: 1 });
        // web_reader may not insert: PostgreSQL refuses (42501).
        await r.run("INSERT INTO shop.orders VALUES (20, 'bob_from_web', 'x')", { sqlstate: '42501' });
        // A FOR TRANSACTION ProxyRole over the session band.
        await r.run('BEGIN', { statement_kind: 'BEGIN' });
        await r.band("SET QUERY_BAND = 'ProxyRole=web_writer;' FOR TRANSACTION", bob('web_writer', '?', 'ProxyRole=web_writer;', reader.session_band));
        const inTx = await r.run('SELECT trustgate.query_band() AS qb, current_user AS cu', { statement_kind: 'SELECT', rows: 1 });
        const txBand = String(inTx.rows[0].qb);
        assert.equal(inTx.rows[0].cu, 'web_writer');
        assert.match(txBand, /^ProxyRole=web_writer;ProxyUser=bob_from_web;/);
        for (const e of r.expected.slice(-2)) e.query_band = txBand;
        r.id = { ...r.id, query_band: txBand };
        await r.run(ext('INSERT INTO shop.orders VALUES ($1, $2, $3)', [21, 'bob_from_web', 'lamp']), { statement_kind: 'INSERT', rows: 1 });
        await r.run('ROLLBACK', { statement_kind: 'ROLLBACK' });
        r.id = reader;
        // ProxyRole ALL: the label is logged.
        await r.band(ext("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=ALL;' FOR SESSION"), bob('ALL', 'ProxyUser=bob_from_web;ProxyRole=ALL;'));
        await r.run(ext('SELECT count(*) AS n FROM shop.orders'), { statement_kind: 'SELECT', rows: 1 });
        await r.band('SET QUERY_BAND = NONE FOR SESSION', NO_PROXY);
        // FOR TRANSACTION from no proxy, extended protocol throughout.
        await r.run(ext('BEGIN'), { statement_kind: 'BEGIN' });
        const writer = bob('web_writer', 'ProxyUser=bob_from_web;ProxyRole=web_writer;ticket=9;', 'ProxyUser=bob_from_web;ProxyRole=web_writer;ticket=9;', null);
        await r.band(ext("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_writer;ticket=9;' FOR TRANSACTION"), writer);
        await r.run(ext('INSERT INTO shop.orders VALUES ($1, $2, $3)', [22, 'bob_from_web', 'pen']), { statement_kind: 'INSERT', rows: 1 });
        await r.run(ext('ROLLBACK'), { statement_kind: 'ROLLBACK' });
        r.id = NO_PROXY;
        await r.run('SELECT 2 AS two', { statement_kind: 'SELECT', rows: 1 });
        await r.check(mode);
      } finally {
        await r.conn.c.end();
      }
    });

    it('logs every statement of a psql script once, under the band in force', async () => {
      const marker = `psql-${mode}`;
      const statements: [string, Partial<Expected> & Id][] = [
        [`SELECT '${marker}' AS marker;`, { statement_kind: 'SELECT', rows: 1, ...NO_PROXY }],
        ["SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION;", { statement_kind: 'SET QUERY_BAND', ...bobReader() }],
        ['SELECT id FROM shop.orders;', { statement_kind: 'SELECT', rows: 1, ...bobReader() }],
        ['BEGIN;', { statement_kind: 'BEGIN', ...bobReader() }],
        // The transaction band's pairs override the session band's of the same name (ProxyRole too).
        ["SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=ALL;order=44;' FOR TRANSACTION;", { statement_kind: 'SET QUERY_BAND', ...aliceTx() }],
        ['SELECT id FROM shop.orders ORDER BY id;', { statement_kind: 'SELECT', rows: 2, ...aliceTx() }],
        ['COMMIT;', { statement_kind: 'COMMIT', ...aliceTx() }],
        ['SELECT id FROM shop.orders;', { statement_kind: 'SELECT', rows: 1, ...bobReader() }],
        ['SET QUERY_BAND = NONE FOR SESSION;', { statement_kind: 'SET QUERY_BAND', ...NO_PROXY }],
      ];
      function aliceTx(): Id {
        const t = 'ProxyUser=alice;ProxyRole=ALL;order=44;';
        return { proxy_user: 'alice', proxy_role: 'ALL', proxy_kind: 'permanent', query_band: t, transaction_band: t, session_band: bobReader().session_band };
      }
      function bobReader(): Id {
        const b = 'ProxyUser=bob_from_web;ProxyRole=web_reader;';
        return { proxy_user: 'bob_from_web', proxy_role: 'web_reader', proxy_kind: 'application', query_band: b, transaction_band: null, session_band: b };
      }
      const file = path.join(tmp, `${marker}.sql`);
      fs.writeFileSync(file, statements.map(([s]) => s).join('\n') + '\n');
      const out = await run(
        'psql',
        ['-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app_tier', '-d', 'postgres', '-f', file],
        { PGPASSWORD: TRUST_USERS.app_tier },
        20_000,
      );
      assert.equal(out.code, 0, out.stderr);
      const found = await poll(
        stack,
        () => rows('SELECT client_session FROM trustgate.query_log WHERE instance = $1 AND statement_text = $2', [instance, statements[0][0]]),
        (x) => x.length === 1,
        'the psql marker',
      );
      const session = String(found[0].client_session);
      const logged = await poll(
        stack,
        () => rows(`SELECT ${QUERY_COLUMNS} FROM trustgate.query_log WHERE instance = $1 AND client_session = $2 ORDER BY log_id`, [instance, session]),
        (x) => x.length >= statements.length,
        'the psql rows',
      );
      await sleep(100);
      await stack.gw.audit.flush();
      const again = await rows('SELECT count(*)::int AS n FROM trustgate.query_log WHERE instance = $1 AND client_session = $2', [instance, session]);
      assert.equal(again[0].n, statements.length, 'one row per statement psql sent, no more');
      statements.forEach(([text, e], i) => {
        const want = { statement_text: text, rows: null, sqlstate: null, result: 'ok', trusted_request: false, ...e };
        const actual = Object.fromEntries(Object.keys(want).map((k) => [k, logged[i][k]]));
        assert.deepEqual(actual, want, `psql statement ${i + 1}`);
        assert.equal(logged[i].trusted_user, 'app_tier');
        assert.equal(logged[i].pool_mode, mode);
        assert.match(String(logged[i].client_addr), /^127\.0\.0\.1:\d+$/);
      });
    });

    it('marks trusted requests (TRUST ONLY, withProxy) and never logs the trust key', async () => {
      assert.equal((await admin.c.query('GRANT CONNECT THROUGH app_tier WITH TRUST ONLY')).command, 'GRANT');
      const pool = new pg.Pool({ ...stack.clientConfig('app_tier'), max: 1 });
      const app = await connect(stack, 'app_tier');
      let key = '';
      try {
        key = String((await admin.c.query("SELECT trustgate.trust_key('app_tier') AS k")).rows[0].k);
        assert.match(key, /^[0-9a-f]{64}$/);
        // The pool's one connection: a marker request, then two withProxy calls on it.
        const pc = await pool.connect();
        const addr = `127.0.0.1:${(pc as unknown as { connection: { stream: { localPort: number } } }).connection.stream.localPort}`;
        const r = new Requests({ c: pc as unknown as pg.Client, addr }, stack, instance);
        await r.start(`trusted-${mode}`);
        pc.release();
        const who = await withProxy(pool, { proxyUser: 'bob_from_web', proxyRole: 'web_reader', band: { order: '9' }, trustKey: key }, async (c: pg.PoolClient) => (await c.query('SELECT id FROM shop.orders')).rows);
        assert.deepEqual(who, [{ id: 3 }]);
        const b = 'ProxyUser=bob_from_web;ProxyRole=web_reader;order=9;';
        const bobTx: Id = { proxy_user: 'bob_from_web', proxy_role: 'web_reader', proxy_kind: 'application', query_band: b, transaction_band: b, session_band: null };
        const marked = "/*trustgate:trusted=(redacted)*/ SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;order=9;' FOR TRANSACTION";
        r.expected.push(
          { ...NO_PROXY, statement_text: 'BEGIN', statement_kind: 'BEGIN', rows: null, sqlstate: null, result: 'ok', trusted_request: false },
          { ...bobTx, statement_text: marked, statement_kind: 'SET QUERY_BAND', rows: null, sqlstate: null, result: 'ok', trusted_request: true },
          { ...bobTx, statement_text: 'SELECT id FROM shop.orders', statement_kind: 'SELECT', rows: 1, sqlstate: null, result: 'ok', trusted_request: false },
          { ...bobTx, statement_text: 'COMMIT', statement_kind: 'COMMIT', rows: null, sqlstate: null, result: 'ok', trusted_request: false },
        );
        await withProxy(pool, { proxyUser: 'alice', trustKey: key }, async (c: pg.PoolClient) => c.query('SELECT 1'));
        const a = alice('ProxyUser=alice;', 'transaction');
        r.expected.push(
          { ...NO_PROXY, statement_text: 'BEGIN', statement_kind: 'BEGIN', rows: null, sqlstate: null, result: 'ok', trusted_request: false },
          { ...a, statement_text: "/*trustgate:trusted=(redacted)*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION", statement_kind: 'SET QUERY_BAND', rows: null, sqlstate: null, result: 'ok', trusted_request: true },
          { ...a, statement_text: 'SELECT 1', statement_kind: 'SELECT', rows: 1, sqlstate: null, result: 'ok', trusted_request: false },
          { ...a, statement_text: 'COMMIT', statement_kind: 'COMMIT', rows: null, sqlstate: null, result: 'ok', trusted_request: false },
        );
        await r.check(mode);
        const granted = await accessRows(instance, r.session);
        assert.deepEqual(
          granted.map((x) => [x.event, x.decision, x.proxy_user, x.proxy_role, x.query_band, x.statement_text]),
          [
            ['proxy_granted', 'granted', 'bob_from_web', 'web_reader', b, marked],
            ['proxy_granted', 'granted', 'alice', 'alice', 'ProxyUser=alice;', "/*trustgate:trusted=(redacted)*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION"],
          ],
        );
        // Unmarked, wrongly marked and misplaced markings are refused and logged as untrusted.
        const u = new Requests(app, stack, instance);
        await u.start(`untrusted-${mode}`);
        await u.run("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION", { sqlstate: '42501', result: 'refused' });
        // The logged texts keep the markings, without their keys.
        await u.run(`/*trustgate:trusted=${'0'.repeat(64)}*/ SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION`, {
          sqlstate: '42501',
          result: 'refused',
          statement_text: "/*trustgate:trusted=(redacted)*/ SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION",
        });
        await u.run(`SELECT 1; /*trustgate:trusted=${key}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`, {
          sqlstate: '42501',
          result: 'refused',
          statement_text: "SELECT 1; /*trustgate:trusted=(redacted)*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION",
        });
        // Pairs that leave the proxy alone need no marking.
        await u.band("SET QUERY_BAND = 'order=7;' UPDATE FOR SESSION", { ...NO_PROXY, query_band: 'order=7;', session_band: 'order=7;' });
        await u.check(mode);
        const refused = await accessRows(instance, u.session);
        assert.deepEqual(
          refused.map((x) => [x.event, x.decision, x.trusted_user, x.proxy_user, x.sqlstate, x.client_addr]),
          [
            ['untrusted_refused', 'refused', 'app_tier', 'alice', '42501', app.addr],
            ['untrusted_refused', 'refused', 'app_tier', 'carol', '42501', app.addr],
            ['untrusted_refused', 'refused', 'app_tier', null, '42501', app.addr],
          ],
        );
        assert.match(refused[0].message, /accepts proxy changes only in trusted requests/);
        assert.equal(refused[1].message, 'invalid trusted-request marking');
        assert.match(refused[2].message, /must start the request/);
      } finally {
        await app.c.end().catch(() => undefined);
        await pool.end();
        assert.equal((await admin.c.query('REVOKE CONNECT THROUGH app_tier WITH TRUST ONLY')).command, 'REVOKE');
      }
      // The administrator's TRUST ONLY changes are in the access log, under the administrator.
      const adminRows = await poll(
        stack,
        () => rows(`SELECT ${ACCESS_COLUMNS} FROM trustgate.access_log WHERE instance = $1 AND client_addr = $2 AND statement_text LIKE '%TRUST ONLY' ORDER BY log_id`, [instance, admin.addr]),
        (x) => x.length >= 2,
        'the TRUST ONLY grant and revoke',
      );
      assert.deepEqual(
        adminRows.map((x) => [x.event, x.decision, x.trusted_user, x.statement_text]),
        [
          ['connect_through_grant', 'granted', 'secadm', 'GRANT CONNECT THROUGH app_tier WITH TRUST ONLY'],
          ['connect_through_revoke', 'granted', 'secadm', 'REVOKE CONNECT THROUGH app_tier WITH TRUST ONLY'],
        ],
      );
      // The key is nowhere in either log (nor in the other instance's rows).
      const leaks = await rows("SELECT (SELECT count(*) FROM trustgate.query_log q WHERE q::text LIKE '%' || $1 || '%')::int AS q, (SELECT count(*) FROM trustgate.access_log a WHERE a::text LIKE '%' || $1 || '%')::int AS a", [key]);
      assert.deepEqual(leaks, [{ q: 0, a: 0 }]);
    });

    it('logs refused switches, tamper attempts, PostgreSQL refusals and CONNECT THROUGH changes in the access log', async () => {
      const r = new Requests(await connect(stack, 'app_tier'), stack, instance);
      const carolNonAdmin = await connect(stack, 'carol');
      try {
        await r.start(`access-${mode}`);
        // Refused switches: no rule; ProxyRole not in a WITH ROLE rule; ProxyRole under WITHOUT ROLE
        // that PostgreSQL refuses (the membership check).
        await r.run("SET QUERY_BAND = 'ProxyUser=mallory;' FOR SESSION", { sqlstate: '42501', result: 'refused' });
        await r.run("SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=web_writer;' FOR SESSION", { sqlstate: '42501', result: 'refused' });
        await r.run("SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=NONE;' FOR SESSION", { sqlstate: '22023', result: 'refused' });
        await r.run("SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=web_writer;' FOR SESSION", { sqlstate: '42501', result: 'refused' });
        const carol: Id = { proxy_user: 'carol', proxy_role: 'web_reader', proxy_kind: 'permanent', query_band: 'ProxyUser=carol;', transaction_band: null, session_band: 'ProxyUser=carol;' };
        await r.band("SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION", carol);
        // Tamper attempts under a proxy.
        await r.run('SET ROLE alice', { sqlstate: '42501', result: 'refused' });
        await r.run(ext("SELECT set_config('role', 'alice', false)"), { sqlstate: '42501', result: 'refused' });
        // PostgreSQL's own refusal, as the proxy.
        await r.run('SELECT * FROM shop.audit_notes', { sqlstate: '42501' });
        await r.run(ext('SELECT * FROM shop.secrets WHERE s = $1', ['x']), { sqlstate: '42501' });
        // GRANT / REVOKE CONNECT THROUGH by an administrator; a rule revoked under an open session.
        assert.equal((await admin.c.query('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE')).command, 'GRANT');
        const dave: Id = { proxy_user: 'dave', proxy_role: 'dave', proxy_kind: 'permanent', query_band: 'ProxyUser=dave;trip=1;', transaction_band: null, session_band: 'ProxyUser=dave;trip=1;' };
        await r.band("SET QUERY_BAND = 'ProxyUser=dave;trip=1;' FOR SESSION", dave);
        await r.run('SELECT current_user AS cu', { statement_kind: 'SELECT', rows: 1 });
        assert.equal((await admin.c.query('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave')).command, 'REVOKE');
        await r.run('SELECT 1', { sqlstate: '42501', result: 'refused' });
        await r.band('SET QUERY_BAND = NONE FOR SESSION', NO_PROXY);
        await r.check(mode);
        // A non-administrator's GRANT and REVOKE: refused by the catalog (PostgreSQL), logged once each.
        await assert.rejects(carolNonAdmin.c.query('GRANT CONNECT THROUGH app_tier TO PERMANENT carol WITHOUT ROLE'), (e: Error & { code?: string }) => e.code === '42501');
        await assert.rejects(carolNonAdmin.c.query('REVOKE CONNECT THROUGH app_tier FROM PERMANENT alice'), (e: Error & { code?: string }) => e.code === '42501');

        const got = await poll(stack, () => accessRows(instance, r.session), (x) => x.length >= 11, 'the access rows of the app session');
        const band = (x: Row) => x.query_band;
        const mark = (x: Row) => [x.event, x.decision, x.trusted_user, x.proxy_user, x.proxy_role, band(x), x.sqlstate, x.statement_text, x.client_addr];
        const A = r.conn.addr;
        assert.deepEqual(got.map(mark), [
          ['proxy_refused', 'refused', 'app_tier', 'mallory', null, null, '42501', "SET QUERY_BAND = 'ProxyUser=mallory;' FOR SESSION", A],
          ['proxy_refused', 'refused', 'app_tier', 'carol', 'web_writer', null, '42501', "SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=web_writer;' FOR SESSION", A],
          ['proxy_refused', 'refused', 'app_tier', 'carol', 'NONE', null, '22023', "SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=NONE;' FOR SESSION", A],
          ['proxy_refused', 'refused', 'app_tier', 'alice', 'web_writer', null, '42501', "SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=web_writer;' FOR SESSION", A],
          ['proxy_granted', 'granted', 'app_tier', 'carol', 'web_reader', 'ProxyUser=carol;', null, "SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION", A],
          ['tamper_refused', 'refused', 'app_tier', 'carol', 'web_reader', 'ProxyUser=carol;', '42501', 'SET ROLE alice', A],
          ['tamper_refused', 'refused', 'app_tier', 'carol', 'web_reader', 'ProxyUser=carol;', '42501', "SELECT set_config('role', 'alice', false)", A],
          ['server_refused', 'refused', 'app_tier', 'carol', 'web_reader', 'ProxyUser=carol;', '42501', 'SELECT * FROM shop.audit_notes', A],
          ['server_refused', 'refused', 'app_tier', 'carol', 'web_reader', 'ProxyUser=carol;', '42501', 'SELECT * FROM shop.secrets WHERE s = $1', A],
          ['proxy_granted', 'granted', 'app_tier', 'dave', 'dave', 'ProxyUser=dave;trip=1;', null, "SET QUERY_BAND = 'ProxyUser=dave;trip=1;' FOR SESSION", A],
          ['proxy_refused', 'refused', 'app_tier', 'dave', 'dave', 'ProxyUser=dave;trip=1;', '42501', 'SELECT 1', A],
        ]);
        assert.match(got[0].message, /no CONNECT THROUGH rule for proxy user "mallory"/);
        assert.match(got[1].message, /role "web_writer" is not in the CONNECT THROUGH rule for proxy user "carol"/);
        assert.match(got[3].message, /proxy user "alice" is not a member of role "web_writer"/);
        assert.deepEqual(got[4].rule, { kind: 'permanent', proxyRole: null, role: 'web_reader' });
        assert.match(got[5].message, /SET ROLE is not allowed while a proxy user is in force/);
        assert.match(got[6].message, /set_config\('role'\) is not allowed/);
        assert.equal(got[7].message, 'permission denied for table audit_notes');
        assert.equal(got[8].message, 'permission denied for table secrets');
        assert.match(got[10].message, /dave/);
        for (const x of got) {
          assert.equal(x.client_session, r.session);
          assert.equal(x.database, 'postgres');
        }
        // The administrator's and the non-administrator's CONNECT THROUGH statements.
        const ct = await poll(
          stack,
          () => rows(`SELECT ${ACCESS_COLUMNS} FROM trustgate.access_log WHERE instance = $1 AND event LIKE 'connect_through_%' AND statement_text ~ '(dave|carol WITHOUT|FROM PERMANENT alice)' ORDER BY log_id`, [instance]),
          (x) => x.length >= 4,
          'the CONNECT THROUGH rows',
        );
        assert.deepEqual(
          ct.map((x) => [x.event, x.decision, x.trusted_user, x.sqlstate, x.statement_text, x.client_addr]),
          [
            ['connect_through_grant', 'granted', 'secadm', null, 'GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE', admin.addr],
            ['connect_through_revoke', 'granted', 'secadm', null, 'REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave', admin.addr],
            ['connect_through_grant', 'refused', 'carol', '42501', 'GRANT CONNECT THROUGH app_tier TO PERMANENT carol WITHOUT ROLE', carolNonAdmin.addr],
            ['connect_through_revoke', 'refused', 'carol', '42501', 'REVOKE CONNECT THROUGH app_tier FROM PERMANENT alice', carolNonAdmin.addr],
          ],
        );
        assert.match(ct[2].message, /permission denied to grant or revoke CONNECT THROUGH/);
        // Logged once: no second (server_refused) row for the refused GRANT/REVOKE.
        const carolRows = await rows('SELECT event FROM trustgate.access_log WHERE instance = $1 AND client_addr = $2 ORDER BY log_id', [instance, carolNonAdmin.addr]);
        assert.deepEqual(carolRows.map((x) => x.event), ['connect_through_grant', 'connect_through_revoke']);
      } finally {
        await r.conn.c.end().catch(() => undefined);
        await carolNonAdmin.c.end().catch(() => undefined);
      }
    });

    it('answers "what did alice do, through which middle tier, under which role, and what was refused" with one SQL query', async () => {
      await admin.c.query('GRANT CONNECT THROUGH other_tier TO PERMANENT alice WITHOUT ROLE');
      const since = new Date(Date.now() - 1);
      const app = await connect(stack, 'app_tier');
      const other = await connect(stack, 'other_tier');
      const bobClient = await connect(stack, 'app_tier');
      try {
        const ok = (c: Conn, sql: string) => c.c.query(sql);
        const no = (c: Conn, sql: string) => assert.rejects(c.c.query(sql), (e: Error & { code?: string }) => e.code === '42501');
        await ok(app, "SET QUERY_BAND = 'ProxyUser=alice;ticket=7;' FOR SESSION");
        await ok(app, 'SELECT id FROM shop.orders ORDER BY id');
        await no(app, 'SELECT * FROM shop.secrets');
        await no(app, 'SET ROLE carol');
        await no(app, "SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=web_writer;' FOR SESSION");
        await ok(app, 'SET QUERY_BAND = NONE FOR SESSION');
        // Others' activity does not belong in the answer.
        await ok(bobClient, "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION");
        await ok(bobClient, 'SELECT id FROM shop.orders');
        await ok(app, 'SELECT 1');
        // alice through a second middle tier.
        await ok(other, 'BEGIN');
        await ok(other, "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION");
        await no(other, "INSERT INTO shop.orders VALUES (30, 'alice', 'kite')");
        await ok(other, 'ROLLBACK');
      } finally {
        for (const c of [app, other, bobClient]) await c.c.end().catch(() => undefined);
        await admin.c.query('REVOKE CONNECT THROUGH other_tier FROM PERMANENT alice');
      }
      // THE query (docs would give it with a day range: at >= current_date - 1). Run by a member of
      // trustgate_auditor, through the gateway.
      const ONE_QUERY = `
        SELECT at, log, trusted_user AS middle_tier, proxy_user, proxy_role AS role, query_band,
               action, outcome, refused, sqlstate, statement_text, message
        FROM trustgate.audit_trail
        WHERE end_user = $1 AND at >= $2 AND at < $3
        ORDER BY at, log, log_id`;
      const auditor = await connect(stack, AUDITOR.user);
      let answer: Row[] = [];
      try {
        const until = new Date(Date.now() + 60_000);
        answer = await poll(
          stack,
          async () => (await auditor.c.query(ONE_QUERY, ['alice', since, until])).rows,
          (x) => x.length >= 14,
          "alice's day",
        );
        // The same with yesterday and today as the window contains all of it.
        const day = (await auditor.c.query(ONE_QUERY.replace('at >= $2 AND at < $3', "at >= current_date - 1 AND at < current_date + 1 AND instance = $2"), ['alice', instance])).rows;
        const key = (x: Row) => `${x.log}|${x.action}|${x.statement_text}|${new Date(x.at).toISOString()}`;
        const dayKeys = new Set(day.map(key));
        for (const x of answer) assert.ok(dayKeys.has(key(x)), `today's answer contains ${key(x)}`);
      } finally {
        await auditor.c.end();
      }
      for (let i = 1; i < answer.length; i++) assert.ok(new Date(answer[i - 1].at) <= new Date(answer[i].at), 'ordered by time');
      const line = (x: Row) => [x.log, x.middle_tier, x.proxy_user, x.role, x.action, x.outcome, x.refused, x.sqlstate, x.statement_text].join(' | ');
      const want = [
        ['query', 'app_tier', 'alice', 'alice', 'SET QUERY_BAND', 'ok', false, '', "SET QUERY_BAND = 'ProxyUser=alice;ticket=7;' FOR SESSION"],
        ['access', 'app_tier', 'alice', 'alice', 'proxy_granted', 'granted', false, '', "SET QUERY_BAND = 'ProxyUser=alice;ticket=7;' FOR SESSION"],
        ['query', 'app_tier', 'alice', 'alice', 'SELECT', 'ok', false, '', 'SELECT id FROM shop.orders ORDER BY id'],
        ['query', 'app_tier', 'alice', 'alice', '', 'error', true, '42501', 'SELECT * FROM shop.secrets'],
        ['access', 'app_tier', 'alice', 'alice', 'server_refused', 'refused', true, '42501', 'SELECT * FROM shop.secrets'],
        ['query', 'app_tier', 'alice', 'alice', '', 'refused', true, '42501', 'SET ROLE carol'],
        ['access', 'app_tier', 'alice', 'alice', 'tamper_refused', 'refused', true, '42501', 'SET ROLE carol'],
        ['query', 'app_tier', 'alice', 'alice', '', 'refused', true, '42501', "SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=web_writer;' FOR SESSION"],
        ['access', 'app_tier', 'alice', 'web_writer', 'proxy_refused', 'refused', true, '42501', "SET QUERY_BAND = 'ProxyUser=alice;ProxyRole=web_writer;' FOR SESSION"],
        ['query', 'other_tier', 'alice', 'alice', 'SET QUERY_BAND', 'ok', false, '', "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION"],
        ['access', 'other_tier', 'alice', 'alice', 'proxy_granted', 'granted', false, '', "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION"],
        ['query', 'other_tier', 'alice', 'alice', '', 'error', true, '42501', "INSERT INTO shop.orders VALUES (30, 'alice', 'kite')"],
        ['access', 'other_tier', 'alice', 'alice', 'server_refused', 'refused', true, '42501', "INSERT INTO shop.orders VALUES (30, 'alice', 'kite')"],
        ['query', 'other_tier', 'alice', 'alice', 'ROLLBACK', 'ok', false, '', 'ROLLBACK'],
      ].map((x) => x.join(' | '));
      // GRANT/REVOKE for other_tier are the administrator's (end user secadm), not alice's.
      const got = answer.map(line);
      // Rows of one request with the same timestamp may come in either order: compare as sets, then
      // the time line per log.
      assert.deepEqual([...got].sort(), [...want].sort(), `alice's day:\n${got.join('\n')}`);
      assert.deepEqual(got.filter((x) => x.startsWith('query')), want.filter((x) => x.startsWith('query')));
      assert.deepEqual(got.filter((x) => x.startsWith('access')), want.filter((x) => x.startsWith('access')));
      // Bands as they were in force.
      assert.ok(answer.filter((x) => x.middle_tier === 'app_tier' && x.log === 'query').every((x) => x.query_band === 'ProxyUser=alice;ticket=7;'));
      assert.ok(answer.filter((x) => x.middle_tier === 'other_tier' && x.action !== 'ROLLBACK').every((x) => x.query_band === 'ProxyUser=alice;'));
      assert.match(String(answer.find((x) => x.action === 'proxy_refused')?.message), /not a member of role "web_writer"/);
    });

    it('records the creator of objects: the permanent proxy user, the trusted user for an application user, else the session user', async () => {
      const r = new Requests(await connect(stack, 'app_tier'), stack, instance);
      const t = (who: string) => `public.cr_${who}_${mode}`;
      try {
        await r.start(`creators-${mode}`);
        await r.run(`CREATE TABLE ${t('plain')} (x int)`, { statement_kind: 'CREATE TABLE' });
        const a = alice('ProxyUser=alice;', 'session');
        await r.band("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION", a);
        await r.run(`CREATE TABLE ${t('alice')} (x int)`, { statement_kind: 'CREATE TABLE' });
        await r.band('SET QUERY_BAND = NONE FOR SESSION', NO_PROXY);
        const led = `SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; CREATE TABLE ${t('alice_led')} (x int)`;
        await r.run(led, { statement_kind: 'SET QUERY_BAND' }, alice('ProxyUser=alice;', 'transaction'));
        const b = 'ProxyUser=bob_from_web;ProxyRole=web_writer;';
        await r.band(`SET QUERY_BAND = '${b}' FOR SESSION`, { proxy_user: 'bob_from_web', proxy_role: 'web_writer', proxy_kind: 'application', query_band: b, transaction_band: null, session_band: b });
        await r.run(ext(`CREATE TABLE ${t('bob')} (x int)`), { statement_kind: 'CREATE TABLE' });
        await r.band('SET QUERY_BAND = NONE FOR SESSION', NO_PROXY);
        await r.check(mode);
      } finally {
        await r.conn.c.end().catch(() => undefined);
      }
      const creators = await rows(
        'SELECT object_identity, creator, creator_source, proxy_user, proxy_role, trusted_user, owner, session_user_name, identity_status FROM trustgate.object_creators WHERE object_identity = ANY($1) ORDER BY object_identity',
        [['plain', 'alice', 'alice_led', 'bob'].map(t)],
      );
      const by = Object.fromEntries(creators.map((c) => [c.object_identity, c]));
      const pick = (c: Row) => [c.creator, c.creator_source, c.proxy_user, c.trusted_user, c.owner, c.session_user_name, c.identity_status];
      assert.deepEqual(pick(by[t('plain')]), ['app_tier', 'session_user', null, null, 'app_tier', 'app_tier', 'none']);
      assert.deepEqual(pick(by[t('alice')]), ['alice', 'permanent_proxy', 'alice', 'app_tier', 'alice', 'app_tier', 'verified']);
      assert.deepEqual(pick(by[t('alice_led')]), ['alice', 'permanent_proxy', 'alice', 'app_tier', 'alice', 'app_tier', 'verified']);
      assert.deepEqual(pick(by[t('bob')]), ['app_tier', 'application_proxy', 'bob_from_web', 'app_tier', 'web_writer', 'app_tier', 'verified']);
      assert.equal(by[t('bob')].proxy_role, 'web_writer');
    });

    it('keeps the log writer off the request path: 2,000 requests finish while the log table is locked, then all 2,000 rows arrive', async () => {
      const CLIENTS = 4;
      const PER_CLIENT = 500;
      const bands = [
        "SET QUERY_BAND = 'ProxyUser=alice;burst=1;' FOR SESSION",
        "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;burst=2;' FOR SESSION",
        "SET QUERY_BAND = 'ProxyUser=carol;burst=3;' FOR SESSION",
        'SET QUERY_BAND = NONE FOR SESSION',
      ];
      const clients = await Promise.all(Array.from({ length: CLIENTS }, () => connect(stack, 'app_tier')));
      const before = stack.gw.audit.stats().database!;
      const locker = new pg.Client(db.connectionConfig());
      await locker.connect();
      try {
        for (let i = 0; i < CLIENTS; i++) await clients[i].c.query(bands[i]);
        await stack.gw.audit.flush();
        // The writer's next INSERT waits for this lock; requests must not.
        await locker.query('BEGIN');
        await locker.query('LOCK TABLE trustgate.query_log IN ACCESS EXCLUSIVE MODE');
        const started = Date.now();
        await Promise.all(
          clients.map(async ({ c }, i) => {
            for (let j = 0; j < PER_CLIENT; j++) {
              const text = `SELECT $1::int AS n /* burst ${i} */`;
              const res = j % 2 === 0 ? await c.query(text, [j]) : await c.query(ext(text, [j]));
              assert.equal(res.rows[0].n, j);
            }
          }),
        );
        const burstMs = Date.now() - started;
        // Not vacuous: the writer is there, waiting for the lock.
        let waiting = 0;
        for (let i = 0; i < 100 && waiting === 0; i++) {
          waiting = (await locker.query("SELECT count(*)::int AS n FROM pg_locks WHERE relation = 'trustgate.query_log'::regclass AND NOT granted")).rows[0].n;
          if (waiting === 0) await sleep(20);
        }
        assert.ok(waiting > 0, 'the audit writer waits for the locked table');
        const held = await locker.query("SELECT count(*)::int AS n FROM trustgate.query_log WHERE instance = $1 AND statement_text LIKE 'SELECT $1::int AS n /* burst %'", [instance]);
        assert.equal(held.rows[0].n, 0, 'no burst row could be written while the table was locked');
        assert.ok(burstMs < 15_000, `burst took ${burstMs} ms`);
        await locker.query('ROLLBACK');
      } finally {
        await locker.end().catch(() => undefined);
        for (const c of clients) await c.c.end().catch(() => undefined);
      }
      const counted = await poll(
        stack,
        () => rows("SELECT statement_text, proxy_user, count(*)::int AS n FROM trustgate.query_log WHERE instance = $1 AND statement_text LIKE 'SELECT $1::int AS n /* burst %' GROUP BY 1, 2 ORDER BY 1", [instance]),
        (x) => x.reduce((s, r) => s + r.n, 0) >= CLIENTS * PER_CLIENT,
        'all burst rows',
        20_000,
      );
      assert.deepEqual(
        counted.map((x) => [x.statement_text, x.proxy_user, x.n]),
        [
          ['SELECT $1::int AS n /* burst 0 */', 'alice', PER_CLIENT],
          ['SELECT $1::int AS n /* burst 1 */', 'bob_from_web', PER_CLIENT],
          ['SELECT $1::int AS n /* burst 2 */', 'carol', PER_CLIENT],
          ['SELECT $1::int AS n /* burst 3 */', null, PER_CLIENT],
        ],
      );
      const s = stack.gw.audit.stats().database!;
      assert.equal(s.dropped, before.dropped, 'nothing dropped');
      assert.equal(s.rejected, before.rejected, 'nothing rejected');
      assert.ok(s.written + s.replayed - before.written - before.replayed >= CLIENTS * PER_CLIENT, JSON.stringify(s));
      assert.equal(s.queued, 0);
    });
  });
}
