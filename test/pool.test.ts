/**
 * Pool behaviour: size limit, wait queue with timeout, max clients, idle and lifetime limits,
 * reconnect after a server restart, reload without dropping connections, graceful drain.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { rmSync } from 'node:fs';
import { preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function connect(stack: Stack, user = 'app'): Promise<pg.Client> {
  const c = new pg.Client(stack.clientConfig(user));
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function backendPids(stack: Stack): Promise<number[]> {
  const rows = await stack.pg.query<{ pid: number }>(
    `select pid from pg_stat_activity where usename = 'app' and backend_type = 'client backend' order by pid`,
  );
  return rows.map((r) => r.pid);
}

describe('pool limits and lifecycle', () => {
  let pgServer: EmbeddedPostgres;
  before(async () => {
    // persistent: stop() keeps the data, so the server can be taken down and brought back.
    pgServer = await preparePostgres({ persistent: true });
  });
  after(async () => {
    await pgServer?.stop();
    if (pgServer) rmSync(pgServer.baseDir, { recursive: true, force: true });
  });

  test('pool size bounds server connections; waiters are served in turn', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 2, wait_timeout_ms: 10_000 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const clients = await Promise.all(Array.from({ length: 8 }, () => connect(stack)));
      const results = await Promise.all(clients.map((c, i) => c.query('select pg_sleep(0.2), $1::int as i', [i])));
      assert.deepEqual(results.map((r) => r.rows[0].i), [0, 1, 2, 3, 4, 5, 6, 7]);
      assert.ok((await backendPids(stack)).length <= 2, 'never more than pool size server connections');
      await Promise.all(clients.map((c) => c.end()));
    } finally {
      await gw.stop(1000);
    }
  });

  test('a client waiting longer than wait_timeout_ms gets a clear error and stays usable', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 1, wait_timeout_ms: 300 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const holder = await connect(stack);
      await holder.query('begin');
      await holder.query('select 1');
      const waiter = await connect(stack).catch((e) => e);
      // Login itself needs a server connection; with the only one held in a transaction it times out.
      assert.ok(waiter instanceof Error, 'login must fail while the pool is exhausted');
      assert.match(String(waiter.message), /no server connection available.*within 300 ms/);
      await holder.query('commit');
      const late = await connect(stack);
      await holder.query('begin');
      const err = await late.query('select 1').catch((e) => e);
      assert.equal(err.code, '57014');
      await holder.query('commit');
      assert.equal((await late.query('select 2 as two')).rows[0].two, 2);
      await Promise.all([holder.end(), late.end()]);
    } finally {
      await gw.stop(1000);
    }
  });

  test('max_client_connections refuses extra clients with 53300', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { max_client_connections: 2 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const a = await connect(stack);
      const b = await connect(stack);
      const err = await connect(stack).catch((e) => e);
      assert.equal(err.code, '53300');
      await a.end();
      await sleep(50);
      const c = await connect(stack);
      assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
      await Promise.all([b.end(), c.end()]);
    } finally {
      await gw.stop(1000);
    }
  });

  test('idle server connections are closed after idle_timeout_ms, old ones after lifetime_ms', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 2, idle_timeout_ms: 500, lifetime_ms: 0 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const c = await connect(stack);
      await c.query('select 1');
      assert.equal((await backendPids(stack)).length, 1);
      await sleep(2200);
      assert.equal((await backendPids(stack)).length, 0, 'idle server connection closed');
      assert.equal((await c.query('select 3 as three')).rows[0].three, 3, 'a new one is opened on demand');
      await c.end();
    } finally {
      await gw.stop(1000);
    }
    const g2 = await startGateway(pgServer, { pool: { default_size: 1, lifetime_ms: 300, idle_timeout_ms: 0 } });
    const s2 = stackOf(pgServer, g2.gw, g2.logs, false);
    try {
      const c = await connect(s2);
      const pid1 = (await c.query('select pg_backend_pid() as p')).rows[0].p;
      await sleep(500);
      await c.query('select 1'); // released after lifetime → closed
      const pid2 = (await c.query('select pg_backend_pid() as p')).rows[0].p;
      assert.notEqual(pid1, pid2, 'connection past its lifetime was replaced');
      await c.end();
    } finally {
      await g2.gw.stop(1000);
    }
  });

  test('reconnects after PostgreSQL restarts; clients get a clear error, then work again', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 2, wait_timeout_ms: 20_000, health_check_after_ms: 0 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const session = await connect(stack);
      await session.query('select 1');
      await pgServer.restart();
      // The idle server connection died with the restart; the next request gets a fresh one.
      const r = await session.query('select 42 as n');
      assert.equal(r.rows[0].n, 42);
      const other = await connect(stack);
      assert.equal((await other.query('select 1 as one')).rows[0].one, 1);
      await Promise.all([session.end(), other.end()]);
    } finally {
      await gw.stop(1000);
    }
  });

  test('a request while PostgreSQL is down waits and succeeds once it is back', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 2, wait_timeout_ms: 20_000 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const c = await connect(stack);
      await c.query('select 1');
      await pgServer.stop();
      const pending = c.query('select 7 as seven');
      await sleep(800);
      await pgServer.start();
      assert.equal((await pending).rows[0].seven, 7);
      await c.end();
    } finally {
      await gw.stop(1000);
    }
  });

  test('reload applies new pool settings without dropping connections (API, admin RELOAD)', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 1 } });
    const stack = stackOf(pgServer, gw, logs, false);
    try {
      const c = await connect(stack);
      await c.query('select 1');
      gw.reload({ ...gw.config, pool: { ...gw.config.pool, default_size: 3 } });
      assert.equal(gw.poolList()[0].settings.size, 3);
      assert.equal((await c.query('select 5 as five')).rows[0].five, 5, 'existing client kept');
      const admin = await connect(stack);
      await admin.end();
      const console_ = new pg.Client({ ...stack.clientConfig('app'), database: 'trustgate' });
      await console_.connect();
      const res = await console_.query('RELOAD');
      assert.equal(res.command, 'RELOAD');
      const pools = await console_.query('SHOW POOLS');
      assert.ok(pools.rows.some((r) => r.user === 'app'));
      await console_.end();
      assert.equal((await c.query('select 6 as six')).rows[0].six, 6);
      await c.end();
    } finally {
      await gw.stop(1000);
    }
  });

  test('graceful stop lets a running transaction finish, refuses new clients, closes idle ones', async () => {
    const { gw, logs } = await startGateway(pgServer, { pool: { default_size: 2 } });
    const stack = stackOf(pgServer, gw, logs, false);
    const busy = await connect(stack);
    const idle = await connect(stack);
    let idleError: Error | null = null;
    idle.on('error', (e) => (idleError = e));
    await busy.query('begin');
    const work = busy.query('select pg_sleep(0.5)').then(() => busy.query('commit'));
    const stopped = gw.stop(5000);
    await sleep(100);
    await work; // the transaction in progress completed
    await stopped;
    await sleep(50);
    assert.ok(idleError, 'idle client was told to go');
    const refused = await new pg.Client(stack.clientConfig('app')).connect().catch((e) => e);
    assert.ok(refused instanceof Error);
  });
});
