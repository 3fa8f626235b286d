/**
 * The user's story of trusted sessions, end to end through trustgate with node-postgres, in both
 * pool modes: an administrator grants CONNECT THROUGH rules; the middle tier `app_tier` sets query
 * bands per request; PostgreSQL checks privileges and row-level security as the proxy; when the
 * request ends nothing of the end user remains.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import { setupTrustWorld, STORY_GRANTS, TRUST_USERS } from './helpers/trust.js';
import { withProxy } from '../src/index.js';

async function client(stack: Stack, user: string): Promise<pg.Client> {
  const c = new pg.Client(stack.clientConfig(user));
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function one(c: pg.Client, sql: string): Promise<Record<string, unknown>> {
  const r = await c.query(sql);
  return r.rows[0];
}

async function refused(promise: Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  await assert.rejects(promise, (err: Error & { code?: string }) => {
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

const WHO = 'SELECT current_user AS cu, session_user AS su, trustgate.proxy_user() AS pu, trustgate.proxy_role() AS pr, trustgate.query_band() AS qb';

for (const mode of ['transaction', 'session'] as const) {
  describe(`trusted sessions: the user's story (${mode} mode)`, () => {
    let stack: Stack;
    let admin: pg.Client;
    let app: pg.Client;

    before(async () => {
      const db = await preparePostgres();
      await setupTrustWorld(db);
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 2 } });
      stack = stackOf(db, gw, logs, true);
      admin = await client(stack, 'secadm');
      for (const grant of STORY_GRANTS) {
        const r = await admin.query(grant);
        assert.equal(r.command, 'GRANT');
      }
      app = await client(stack, 'app_tier');
    });
    after(async () => {
      await admin?.end().catch(() => undefined);
      await app?.end().catch(() => undefined);
      await stack?.stop();
    });

    it('keeps the rules in the catalog view', async () => {
      const rows = (await admin.query("SELECT trusted_user, proxy_user, kind, without_role, roles, status FROM trustgate.connect_rules WHERE status = 'granted' ORDER BY proxy_user")).rows;
      assert.deepEqual(
        rows.map((r) => [r.trusted_user, r.proxy_user, r.kind, r.without_role, r.roles, r.status]),
        [
          ['app_tier', 'alice', 'permanent', true, [], 'granted'],
          ['app_tier', 'bob_from_web', 'application', false, ['web_reader', 'web_writer'], 'granted'],
          ['app_tier', 'carol', 'permanent', false, ['web_reader'], 'granted'],
        ],
      );
    });

    it('runs a FOR TRANSACTION request as a permanent proxy user, with RLS by proxy user, and ends with it', async () => {
      await app.query('BEGIN');
      const set = await app.query("SET QUERY_BAND = 'ProxyUser=alice;order=42;' FOR TRANSACTION;");
      assert.equal(set.command, 'SET');
      const who = await one(app, WHO);
      assert.deepEqual(who, { cu: 'alice', su: 'app_tier', pu: 'alice', pr: null, qb: 'ProxyUser=alice;order=42;' });
      assert.equal((await one(app, "SELECT trustgate.query_band_value('order') AS v")).v, '42');
      const orders = (await app.query('SELECT id FROM shop.orders ORDER BY id')).rows.map((r) => r.id);
      assert.deepEqual(orders, [1, 5]);
      await app.query('COMMIT');
      assert.deepEqual(await one(app, WHO), { cu: 'app_tier', su: 'app_tier', pu: null, pr: null, qb: null });
    });

    it('runs a request led by a FOR TRANSACTION band in one round trip (Teradata multi-statement request)', async () => {
      const sql = "SET QUERY_BAND = 'ProxyUser=alice;req=7;' FOR TRANSACTION; SELECT current_user AS cu, trustgate.query_band_value('req') AS req, count(*)::int AS n FROM shop.orders";
      const results = (await app.query(sql)) as unknown as pg.QueryResult[];
      assert.equal(results[0].command, 'SET');
      assert.deepEqual(results[1].rows, [{ cu: 'alice', req: '7', n: 2 }]);
      assert.deepEqual(await one(app, WHO), { cu: 'app_tier', su: 'app_tier', pu: null, pr: null, qb: null });
      // Error positions point into the client's own text.
      const bad = "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; SELECT no_such_column FROM shop.orders";
      await assert.rejects(app.query(bad), (err: Error & { code?: string; position?: string }) => {
        assert.equal(err.code, '42703');
        assert.equal(Number(err.position), bad.indexOf('no_such_column') + 1);
        return true;
      });
      // A refused band runs nothing of the request.
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR TRANSACTION; INSERT INTO shop.orders VALUES (99, 'x', 'y')"), '42501');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION; SELECT 1"), '0A000');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; SET ROLE carol"), '42501');
      assert.equal((await one(app, 'SELECT count(*)::int AS n FROM shop.orders WHERE id = 99')).n, 0);
      // Inside a transaction block the band lasts until COMMIT.
      await app.query('BEGIN');
      await app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; SELECT 1");
      assert.equal((await one(app, WHO)).cu, 'alice');
      await app.query('COMMIT');
      assert.equal((await one(app, WHO)).cu, 'app_tier');
    });

    it('runs a FOR SESSION band as an application user through its roles until NONE', async () => {
      await app.query("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION");
      const who = await one(app, WHO);
      assert.equal(who.cu, 'web_reader');
      assert.equal(who.pu, 'bob_from_web');
      assert.equal(who.pr, 'web_reader');
      assert.deepEqual((await app.query('SELECT id FROM shop.orders')).rows, [{ id: 3 }]);
      await refused(app.query("INSERT INTO shop.orders VALUES (10, 'bob_from_web', 'x')"), '42501');
      // Session bands survive transactions; ProxyRole can change freely FOR TRANSACTION.
      await app.query('BEGIN');
      await app.query("SET QUERY_BAND = 'ProxyRole=web_writer;' FOR TRANSACTION");
      assert.equal((await one(app, WHO)).cu, 'web_writer');
      await app.query("INSERT INTO shop.orders VALUES (10, 'bob_from_web', 'x')");
      await app.query('ROLLBACK');
      assert.equal((await one(app, WHO)).cu, 'web_reader');
      await app.query("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=ALL;' FOR SESSION");
      const all = await one(app, WHO);
      assert.match(String(all.cu), /^tg_union_/);
      await app.query('BEGIN');
      await app.query("INSERT INTO shop.orders VALUES (11, 'bob_from_web', 'y')");
      assert.deepEqual((await app.query('SELECT id FROM shop.orders ORDER BY id')).rows, [{ id: 3 }, { id: 11 }]);
      await app.query('ROLLBACK');
      await app.query('SET QUERY_BAND = NONE FOR SESSION');
      assert.deepEqual(await one(app, WHO), { cu: 'app_tier', su: 'app_tier', pu: null, pr: null, qb: null });
    });

    it('refuses what the rules do not allow, with the right SQLSTATE, and changes nothing', async () => {
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION"), '42501', /no CONNECT THROUGH rule for proxy user "dave"/);
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=web_writer;' FOR SESSION"), '42501', /not in the CONNECT THROUGH rule/);
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=NONE;' FOR SESSION"), '22023');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=alice' FOR SESSION"), '22023');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION"), '25P01');
      assert.deepEqual(await one(app, WHO), { cu: 'app_tier', su: 'app_tier', pu: null, pr: null, qb: null });
      // Inside a transaction a refusal aborts the transaction, as any failed statement does.
      await app.query('BEGIN');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR TRANSACTION"), '42501');
      await refused(app.query('SELECT 1'), '25P02');
      await app.query('ROLLBACK');
      await app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION");
      await app.query('BEGIN');
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION"), '25001');
      await app.query('ROLLBACK');
      assert.equal((await one(app, WHO)).cu, 'alice');
      await app.query('SET QUERY_BAND = NONE FOR SESSION');
    });

    it('refuses identity changes from SQL text while a proxy is in force', async () => {
      await app.query("SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION");
      for (const sql of ['SET ROLE alice', 'RESET ROLE', "SELECT set_config('role', 'alice', false)", 'DISCARD ALL', "SET trustgate.identity = 'x'", 'SELECT 1; SET ROLE NONE']) {
        await refused(app.query(sql), '42501');
        assert.equal((await one(app, WHO)).cu, 'web_reader', sql);
      }
      await app.query('SET QUERY_BAND = NONE FOR SESSION');
    });

    it('applies TRUST ONLY: proxy changes only in trusted requests', async () => {
      assert.equal((await admin.query('GRANT CONNECT THROUGH app_tier WITH TRUST ONLY')).command, 'GRANT');
      const key = String((await one(admin, "SELECT trustgate.trust_key('app_tier') AS k")).k);
      await refused(app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION"), '42501', /trusted requests/);
      await refused(app.query(`/*trustgate:trusted=${'0'.repeat(64)}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`), '42501', /invalid trusted-request marking/);
      await app.query(`/*trustgate:trusted=${key}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`);
      assert.equal((await one(app, WHO)).cu, 'alice');
      // Band values that do not touch the proxy need no marking.
      await app.query("SET QUERY_BAND = 'order=7;' UPDATE FOR SESSION");
      await refused(app.query('SET QUERY_BAND = NONE FOR SESSION'), '42501');
      await app.query(`/*trustgate:trusted=${key}*/ SET QUERY_BAND = NONE FOR SESSION`);
      // The client helper marks its requests when given the key.
      const pool = new pg.Pool({ ...stack.clientConfig('app_tier'), max: 2 });
      try {
        const rows = await withProxy(pool, { proxyUser: 'alice', band: { order: '9' }, trustKey: key }, async (c: pg.PoolClient) => (await c.query(WHO)).rows[0] as Record<string, unknown>);
        assert.equal(rows.cu, 'alice');
        assert.equal(rows.qb, 'ProxyUser=alice;order=9;');
        await assert.rejects(withProxy(pool, { proxyUser: 'alice' }, async () => 1), (e: Error & { code?: string }) => e.code === '42501');
      } finally {
        await pool.end();
      }
      assert.equal((await admin.query('REVOKE CONNECT THROUGH app_tier WITH TRUST ONLY')).command, 'REVOKE');
    });

    it('shows the rules cache and each client\'s proxy in the admin console', async () => {
      await app.query("SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION");
      await app.query('SELECT 1');
      const consoleClient = new pg.Client(stack.clientConfig('app', 'trustgate'));
      await consoleClient.connect();
      try {
        const trust = (await consoleClient.query('SHOW TRUST')).rows;
        const row = trust.find((r) => r.database === 'postgres');
        assert.ok(row, JSON.stringify(trust));
        assert.equal(row.ready, 'true');
        assert.equal(row.installed, 'true');
        assert.ok(Number(row.trusted_users) >= 1 && Number(row.proxy_rules) >= 3, JSON.stringify(row));
        const clients = (await consoleClient.query('SHOW CLIENTS')).rows.filter((r) => r.user === 'app_tier');
        assert.ok(clients.some((r) => r.proxy_user === 'bob_from_web' && r.proxy_role === 'web_reader'), JSON.stringify(clients));
      } finally {
        await consoleClient.end();
        await app.query('SET QUERY_BAND = NONE FOR SESSION');
      }
    });

    it('makes a revoked rule fail the next request of an open session', async () => {
      await admin.query('GRANT CONNECT THROUGH app_tier TO PERMANENT dave WITHOUT ROLE');
      await app.query("SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION");
      assert.equal((await one(app, WHO)).cu, 'dave');
      assert.equal((await admin.query('REVOKE CONNECT THROUGH app_tier FROM PERMANENT dave')).command, 'REVOKE');
      await refused(app.query('SELECT 1'), '42501', /dave/);
      await app.query('SET QUERY_BAND = NONE FOR SESSION');
      assert.equal((await one(app, WHO)).cu, 'app_tier');
    });
  });
}

describe('trusted sessions across a PostgreSQL restart', () => {
  it('keeps the session band, reloads the rules and switches the new server connections', async () => {
    const db = await preparePostgres();
    await setupTrustWorld(db);
    const { gw, logs } = await startGateway(db, { pool: { mode: 'transaction', default_size: 2, wait_timeout_ms: 20_000, health_check_after_ms: 0 } });
    const stack = stackOf(db, gw, logs, true);
    try {
      const admin = await client(stack, 'secadm');
      await admin.query(STORY_GRANTS[0]);
      await admin.end();
      const app = await client(stack, 'app_tier');
      await app.query("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION");
      assert.equal((await one(app, WHO)).cu, 'alice');
      await db.restart();
      // The rules store reconnects and reloads; the session's next request runs as alice again
      // on a new server connection (a fresh backend, so a fresh switch).
      const after = await one(app, WHO);
      assert.deepEqual(after, { cu: 'alice', su: 'app_tier', pu: 'alice', pr: null, qb: 'ProxyUser=alice;' });
      // A rule change made directly in PostgreSQL (not through this gateway) still reaches the
      // session: only the NOTIFY tells the gateway, so its LISTEN was re-established.
      const revoke = JSON.stringify({ kind: 'revoke-permanent', trustedUser: 'app_tier', users: ['alice'], roles: [] });
      await db.query('CALL trustgate.apply_connect_through($1::jsonb)', [revoke], { user: 'secadm', password: TRUST_USERS.secadm });
      let refusal: string | undefined;
      for (let i = 0; i < 100 && !refusal; i++) {
        refusal = await app.query('SELECT 1').then(
          () => undefined,
          (err: Error & { code?: string }) => `${err.code} ${err.message}`,
        );
        if (!refusal) await new Promise((r) => setTimeout(r, 50));
      }
      assert.match(String(refusal), /^42501 .*alice/);
      await app.end();
    } finally {
      await stack.stop();
    }
  });
});
