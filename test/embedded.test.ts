import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { startPostgres, type EmbeddedPostgres } from './helpers/postgres.js';

describe('embedded postgres', () => {
  let a: EmbeddedPostgres;

  before(async () => {
    a = await startPostgres();
  });
  after(() => a?.stop());

  it('runs PostgreSQL 18 reachable through node-postgres', async () => {
    const client = new pg.Client(a.connectionConfig());
    await client.connect();
    try {
      const res = await client.query<{ version: string }>('select version()');
      assert.match(res.rows[0].version, /PostgreSQL 18/);
    } finally {
      await client.end();
    }
    assert.ok(a.port > 0);
    assert.equal(a.host, '127.0.0.1');
    assert.ok(fs.existsSync(path.join(a.dataDir, 'PG_VERSION')));
    assert.ok(a.socketDir.startsWith(a.baseDir));
    assert.ok(fs.existsSync(path.join(a.socketDir, `.s.PGSQL.${a.port}`)));
    const u = new URL(a.url());
    assert.equal(u.port, String(a.port));
    assert.equal(decodeURIComponent(u.password), a.superuserPassword);
  });

  it('a second parallel instance gets a different port and is independent', async () => {
    const b = await startPostgres();
    try {
      assert.notEqual(b.port, a.port);
      assert.notEqual(b.baseDir, a.baseDir);
      await b.query('create table only_in_b (x int)');
      const rows = await a.query<{ n: number }>(
        "select count(*)::int as n from pg_tables where tablename = 'only_in_b'",
      );
      assert.equal(rows[0].n, 0);
    } finally {
      await b.stop();
    }
  });

  it('enforces SCRAM authentication', async () => {
    const [{ method }] = await a.query<{ method: string }>(
      "select auth_method as method from pg_hba_file_rules where type = 'host' and address = '127.0.0.1' limit 1",
    );
    assert.equal(method, 'scram-sha-256');
    await assert.rejects(
      a.query('select 1', [], { password: 'definitely-wrong' }),
      (err: any) => err.code === '28P01',
    );
    await assert.rejects(
      a.query('select 1', [], { user: 'nobody', password: 'x' }),
      (err: any) => err.code === '28P01',
    );
  });

  it('restart() keeps the port and the data', async () => {
    const port = a.port;
    await a.query('create table survives (id int primary key, v text)');
    await a.query("insert into survives values (1, 'one'), (2, 'two')");
    await a.restart();
    assert.equal(a.port, port);
    const rows = await a.query<{ id: number; v: string }>('select id, v from survives order by id');
    assert.deepEqual(rows, [
      { id: 1, v: 'one' },
      { id: 2, v: 'two' },
    ]);
  });

  it('kill() simulates a crash and start() recovers on the same port', async () => {
    const port = a.port;
    const client = new pg.Client(a.connectionConfig());
    client.on('error', () => undefined);
    await client.connect();
    await a.kill();
    await assert.rejects(client.query('select 1'));
    await client.end().catch(() => undefined);
    await a.start();
    assert.equal(a.port, port);
    const rows = await a.query<{ n: number }>('select count(*)::int as n from survives');
    assert.equal(rows[0].n, 2);
  });

  it('stop() removes the base dir and is idempotent', async () => {
    const c = await startPostgres({ settings: { max_connections: 50 } });
    const [{ max_connections }] = await c.query<{ max_connections: string }>('show max_connections');
    assert.equal(max_connections, '50');
    const base = c.baseDir;
    assert.ok(fs.existsSync(base));
    await c.stop();
    assert.equal(fs.existsSync(base), false);
    await c.stop();
  });
});
