/**
 * Real Node.js clients through the gateway, in both pool modes: node-postgres (with
 * pg-copy-streams) and postgres.js. Queries, prepared statements, transactions, errors, COPY,
 * LISTEN/NOTIFY, cancellation (including a stale cancel key that must not hit another client).
 */
import { describe, test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { createHash } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import postgres from 'postgres';
import { startStack, type Stack } from './helpers/stack.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MODES = ['transaction', 'session'] as const;
const COPY_ROWS = 100_000;

/** Rows `i\tv<i>\n` for i in 1..n, as one buffer (what COPY TO must give back byte for byte). */
function copyPayload(n: number): Buffer {
  const parts: string[] = [];
  for (let i = 1; i <= n; i++) parts.push(`${i}\tv${i}\n`);
  return Buffer.from(parts.join(''));
}

function md5(b: Buffer | string): string {
  return createHash('md5').update(b).digest('hex');
}

/** Sends a raw CancelRequest (protocol 3.0, 4-byte key) to the gateway and waits for it to close. */
function rawCancel(port: number, processId: number, secretKey: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      const b = Buffer.alloc(16);
      b.writeInt32BE(16, 0);
      b.writeInt32BE(80877102, 4);
      b.writeInt32BE(processId, 8);
      b.writeUInt32BE(secretKey >>> 0, 12);
      s.end(b);
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('cancel connection not closed by the gateway within 5 s'));
    }, 5000);
    s.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    s.on('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

type PgClientInternals = pg.Client & { processID: number; secretKey: number };

for (const mode of MODES) {
  describe(`node clients through the gateway (${mode} mode)`, () => {
    let stack: Stack;
    const clients: pg.Client[] = [];

    async function connect(database = 'postgres'): Promise<PgClientInternals> {
      const c = new pg.Client(stack.clientConfig('app', database));
      c.on('error', () => undefined);
      await c.connect();
      clients.push(c);
      return c as PgClientInternals;
    }

    before(async () => {
      stack = await startStack({
        pool: { mode, default_size: 8, wait_timeout_ms: 10_000 },
        // `one` routes to postgres with a single server connection (stale-cancel test),
        // `two` with two (postgres.js concurrency test).
        databases: { one: { dbname: 'postgres', pool_size: 1 }, two: { dbname: 'postgres', pool_size: 2 } },
      });
    });
    // Session mode ties a server connection to each client: close clients after every test.
    afterEach(async () => {
      await Promise.all(clients.splice(0).map((c) => c.end().catch(() => undefined)));
    });
    after(() => stack?.stop());

    describe('node-postgres', () => {
      test('parameterized queries', async () => {
        const c = await connect();
        const r = await c.query('select $1::int + $2::int as sum, $3::text as t, $4::int is null as n', [40, 2, 'héllo', null]);
        assert.deepEqual(r.rows[0], { sum: 42, t: 'héllo', n: true });
        const many = await Promise.all(Array.from({ length: 20 }, (_, i) => c.query('select $1::int * 2 as d', [i])));
        assert.deepEqual(many.map((x) => x.rows[0].d), Array.from({ length: 20 }, (_, i) => i * 2));
      });

      test('named prepared statements are reused and survive server changes', async () => {
        const a = await connect();
        const b = await connect();
        const q = (c: pg.Client, v: number) => c.query({ name: 'double_it', text: 'select $1::int * 2 as d, pg_backend_pid() as pid', values: [v] });
        for (let i = 0; i < 10; i++) {
          // Interleave two clients using the same statement name, concurrently.
          const [ra, rb] = await Promise.all([q(a, i), q(b, i + 100)]);
          assert.equal(ra.rows[0].d, i * 2);
          assert.equal(rb.rows[0].d, (i + 100) * 2);
        }
        // Same name, different text on another client: independent statements per client.
        const other = await connect();
        const r = await other.query({ name: 'double_it', text: 'select $1::text as t', values: ['x'] });
        assert.equal(r.rows[0].t, 'x');
      });

      test('startup parameters (statement_timeout, options -c list values) apply as on a direct connection', async () => {
        const extra = { statement_timeout: 300, application_name: 'tg node', options: '-c search_path=pg_catalog,public -c work_mem=5MB' };
        const settingsSql = `select current_setting('search_path') as sp, current_setting('work_mem') as wm,
          current_setting('statement_timeout') as st, current_setting('application_name') as app`;
        const direct = new pg.Client({ ...stack.pg.connectionConfig(), ...extra } as pg.ClientConfig);
        await direct.connect();
        const expected = (await direct.query(settingsSql)).rows[0];
        await direct.end();
        assert.equal(expected.sp, 'pg_catalog,public'); // a list, not the quoted name "pg_catalog,public"
        const c = new pg.Client({ ...stack.clientConfig('app'), ...extra } as pg.ClientConfig);
        c.on('error', () => undefined);
        await c.connect();
        clients.push(c);
        assert.deepEqual((await c.query(settingsSql)).rows[0], expected);
        const err = await c.query('select pg_sleep(3)').catch((e) => e);
        assert.equal(err.code, '57014');
        assert.match(err.message, /statement timeout/);
        // Another client on the same server connections does not inherit them.
        const plain = await connect();
        const other = (await plain.query(settingsSql)).rows[0];
        assert.equal(other.st, '0');
        assert.equal(other.sp, '"$user", public');
        assert.deepEqual((await c.query(settingsSql)).rows[0], expected);
      });

      test('transaction with rollback', async () => {
        const c = await connect();
        await c.query('create table if not exists tx_t (id int)');
        await c.query('truncate tx_t');
        await c.query('begin');
        await c.query('insert into tx_t values (1), (2)');
        assert.equal((await c.query('select count(*)::int as n from tx_t')).rows[0].n, 2);
        await c.query('rollback');
        assert.equal((await c.query('select count(*)::int as n from tx_t')).rows[0].n, 0);
        // Committed work stays.
        await c.query('begin');
        await c.query({ text: 'insert into tx_t values ($1)', values: [3] });
        await c.query('commit');
        assert.equal((await c.query('select count(*)::int as n from tx_t')).rows[0].n, 1);
        // An error inside a transaction aborts it until rollback.
        await c.query('begin');
        await assert.rejects(c.query('select 1/0'), (e: any) => e.code === '22012');
        await assert.rejects(c.query('select 1'), (e: any) => e.code === '25P02');
        await c.query('rollback');
        assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
      });

      test('syntax error gives 42601 and the connection stays usable', async () => {
        const c = await connect();
        const err = await c.query('selec 1').catch((e) => e);
        assert.equal(err.code, '42601');
        assert.match(err.message, /syntax error at or near "selec"/);
        // Extended protocol error, then more work on the same client.
        const err2 = await c.query('select $1::int from nosuchtable', [1]).catch((e) => e);
        assert.equal(err2.code, '42P01');
        const err3 = await c.query({ name: 'bad_stmt', text: 'selec $1', values: [1] }).catch((e) => e);
        assert.equal(err3.code, '42601');
        assert.equal((await c.query('select 7 as seven')).rows[0].seven, 7);
        assert.equal((await c.query('select $1::int as v', [8])).rows[0].v, 8);
      });

      test(`COPY FROM STDIN and COPY TO STDOUT round trip (${COPY_ROWS} rows)`, async () => {
        const c = await connect();
        await c.query('drop table if exists copy_t');
        await c.query('create table copy_t (id int primary key, v text not null)');
        const payload = copyPayload(COPY_ROWS);
        const chunks: Buffer[] = [];
        for (let off = 0; off < payload.length; off += 64 * 1024) chunks.push(payload.subarray(off, off + 64 * 1024));
        await pipeline(Readable.from(chunks), c.query(copyStreams.from('copy copy_t (id, v) from stdin')));
        const r = await c.query(`select count(*)::int as n, sum(id)::bigint as s, md5(string_agg(v, ',' order by id)) as h from copy_t`);
        assert.equal(r.rows[0].n, COPY_ROWS);
        assert.equal(r.rows[0].s, String((COPY_ROWS * (COPY_ROWS + 1)) / 2));
        const expectedAgg = Array.from({ length: COPY_ROWS }, (_, i) => `v${i + 1}`).join(',');
        assert.equal(r.rows[0].h, md5(expectedAgg));

        const out: Buffer[] = [];
        await pipeline(
          c.query(copyStreams.to('copy (select id, v from copy_t order by id) to stdout')),
          new Writable({
            write(chunk: Buffer, _enc, cb) {
              out.push(chunk);
              cb();
            },
          }),
        );
        const back = Buffer.concat(out);
        assert.equal(back.length, payload.length);
        assert.equal(md5(back), md5(payload));
        // The connection is usable after COPY in both directions.
        assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
      });

      test('COPY FROM STDIN with bad data fails with the server error and the connection recovers', async () => {
        const c = await connect();
        await c.query('create table if not exists copy_bad (id int)');
        const err = await pipeline(Readable.from([Buffer.from('1\n2\nnot-a-number\n')]), c.query(copyStreams.from('copy copy_bad from stdin'))).catch(
          (e) => e,
        );
        assert.ok(err instanceof Error);
        assert.equal((err as any).code, '22P02');
        assert.equal((await c.query('select count(*)::int as n from copy_bad')).rows[0].n, 0);
      });

      test('LISTEN/NOTIFY: the listening client receives notifications', async () => {
        const listener = await connect();
        const sender = await connect();
        const got: { channel: string; payload?: string }[] = [];
        listener.on('notification', (m) => got.push({ channel: m.channel, payload: m.payload }));
        await listener.query('listen tg_chan');
        // Several notifications, from another client, some while the listener is idle.
        await sender.query(`notify tg_chan, 'one'`);
        await sender.query(`select pg_notify('tg_chan', 'two')`);
        await sender.query('select pg_notify($1, $2)', ['tg_chan', 'three']);
        for (let i = 0; i < 250 && got.length < 3; i++) await sleep(20);
        assert.deepEqual(
          got.map((g) => g.payload),
          ['one', 'two', 'three'],
        );
        // The listener still runs queries, and still receives afterwards.
        assert.equal((await listener.query('select 5 as five')).rows[0].five, 5);
        await sender.query(`notify tg_chan, 'four'`);
        for (let i = 0; i < 250 && got.length < 4; i++) await sleep(20);
        assert.equal(got[3]?.payload, 'four');
        await listener.query('unlisten tg_chan');
      });

      test('cancel: pg_sleep(30) is cancelled with 57014 and the client stays usable', async () => {
        const c = await connect();
        assert.ok(c.processID && c.secretKey !== null, 'client received BackendKeyData');
        const started = Date.now();
        const q = c.query('select pg_sleep(30)').catch((e) => e);
        await sleep(300);
        await rawCancel(stack.port, c.processID, c.secretKey);
        const err = await q;
        const elapsed = Date.now() - started;
        assert.equal(err.code, '57014', `expected query_canceled, got ${err.code}: ${err.message}`);
        assert.match(err.message, /canceling statement due to user request/);
        assert.ok(elapsed < 3000, `cancel took ${elapsed} ms`);
        assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
        // And a second cancel works too (inside an explicit transaction this time).
        await c.query('begin');
        const q2 = c.query('select pg_sleep(30)').catch((e) => e);
        await sleep(200);
        await rawCancel(stack.port, c.processID, c.secretKey);
        assert.equal((await q2).code, '57014');
        await c.query('rollback');
        assert.equal((await c.query('select 2 as two')).rows[0].two, 2);
      });

      test('cancel with a wrong key cancels nothing', async () => {
        const c = await connect();
        const q = c.query('select pg_sleep(0.8) as s').then(
          () => 'done',
          (e) => e,
        );
        await sleep(200);
        await rawCancel(stack.port, c.processID, (c.secretKey + 1) | 0);
        await rawCancel(stack.port, (c.processID + 1) | 0, c.secretKey);
        assert.equal(await q, 'done');
      });

      test('cancel requests do not leave client sessions behind', async () => {
        const c = await connect();
        const before = stack.gw.clientCount;
        for (let i = 0; i < 5; i++) await rawCancel(stack.port, c.processID, (c.secretKey + 1 + i) | 0);
        const q = c.query('select pg_sleep(30)').catch((e) => e);
        await sleep(200);
        await rawCancel(stack.port, c.processID, c.secretKey);
        assert.equal((await q).code, '57014');
        for (let i = 0; i < 50 && stack.gw.clientCount !== before; i++) await sleep(20);
        assert.equal(stack.gw.clientCount, before, 'each cancel connection is forgotten once handled');
      });

      if (mode === 'transaction') {
        test('a stale cancel key does not cancel the query of the next client on the same server', async () => {
          // Database `one` has a pool of one server connection: A and B share it in turn.
          const a = await connect('one');
          const b = await connect('one');
          const pidA = (await a.query('select pg_backend_pid() as pid')).rows[0].pid;
          const started = Date.now();
          const qb = b.query('select pg_sleep(2), pg_backend_pid() as pid').then(
            (r) => r.rows[0].pid as number,
            (e) => e,
          );
          await sleep(300);
          // A's query finished long ago; its former server now runs B's sleep.
          await rawCancel(stack.port, a.processID, a.secretKey);
          const pidB = await qb;
          assert.ok(!(pidB instanceof Error), `B's query must not be cancelled: ${(pidB as Error)?.message}`);
          assert.equal(pidB, pidA, 'both clients used the same server connection');
          assert.ok(Date.now() - started >= 1900, 'B slept its full time');
          // A's own key still works for A's own running query afterwards.
          const qa = a.query('select pg_sleep(30)').catch((e) => e);
          await sleep(200);
          await rawCancel(stack.port, a.processID, a.secretKey);
          assert.equal((await qa).code, '57014');
          assert.equal((await b.query('select 1 as one')).rows[0].one, 1);
        });
      }
    });

    describe('postgres.js', () => {
      let sql: postgres.Sql;
      before(() => {
        sql = postgres(stack.url('app'), { max: 4, onnotice: () => undefined, connect_timeout: 10 });
      });
      after(() => sql?.end({ timeout: 2 }));

      test('queries and prepared statements (prepared by default)', async () => {
        const [r] = await sql`select ${41}::int + 1 as n, ${'x'}::text as t`;
        assert.deepEqual({ ...r }, { n: 42, t: 'x' });
        // The same statement many times with different values: prepared once per connection.
        const results = await Promise.all(Array.from({ length: 50 }, (_, i) => sql`select ${i}::int * 3 as v`));
        assert.deepEqual(results.map((x) => x[0].v), Array.from({ length: 50 }, (_, i) => i * 3));
        const rows = await sql`select g as i from generate_series(1, ${1000}::int) g`;
        assert.equal(rows.length, 1000);
        const err = await sql`selec 1`.catch((e) => e);
        assert.equal(err.code, '42601');
        const [ok] = await sql`select ${'still'}::text as s`;
        assert.equal(ok.s, 'still');
        // Unsafe (simple protocol) too.
        const [u] = await sql.unsafe('select 1 as a; select 2 as b').then((x: any) => x.at(-1));
        assert.equal(u.b, 2);
      });

      test('sql.begin commits, and rolls back on error', async () => {
        await sql`create table if not exists pjs_tx (id int)`;
        await sql`truncate pjs_tx`;
        await sql.begin(async (tx) => {
          await tx`insert into pjs_tx values (${1})`;
          await tx`insert into pjs_tx values (${2})`;
        });
        const err = await sql
          .begin(async (tx) => {
            await tx`insert into pjs_tx values (${3})`;
            await tx`select 1/0`;
          })
          .catch((e) => e);
        assert.equal(err.code, '22012');
        const [r] = await sql`select count(*)::int as n, sum(id)::int as s from pjs_tx`;
        assert.deepEqual({ ...r }, { n: 2, s: 3 });
        // Savepoints.
        await sql.begin(async (tx) => {
          await tx`insert into pjs_tx values (${10})`;
          await tx.savepoint(async (sp) => {
            await sp`insert into pjs_tx values (${20})`;
            throw new Error('undo savepoint');
          }).catch(() => undefined);
        });
        const ids = await sql`select id from pjs_tx order by id`;
        assert.deepEqual(ids.map((x) => x.id), [1, 2, 10]);
      });

      test('query.cancel() cancels a running query with 57014', async () => {
        const started = Date.now();
        const q = sql`select pg_sleep(30)`;
        const settled = q.then(
          () => null,
          (e) => e,
        );
        await sleep(300);
        q.cancel();
        const err = await settled;
        assert.ok(err, 'query must be cancelled');
        assert.equal(err.code, '57014');
        assert.ok(Date.now() - started < 3000);
        const [r] = await sql`select 1 as one`;
        assert.equal(r.one, 1);
      });

      test('sql.listen / sql.notify', async () => {
        const got: string[] = [];
        const { unlisten } = await sql.listen('pjs_chan', (payload) => got.push(payload));
        await sql.notify('pjs_chan', 'a');
        await sql.notify('pjs_chan', 'b');
        for (let i = 0; i < 250 && got.length < 2; i++) await sleep(20);
        assert.deepEqual(got, ['a', 'b']);
        await unlisten();
      });

      test('COPY via readable() and writable()', async () => {
        await sql`drop table if exists pjs_copy`;
        await sql`create table pjs_copy (id int, v text)`;
        const n = 20_000;
        const payload = copyPayload(n);
        const writable = await sql`copy pjs_copy (id, v) from stdin`.writable();
        await pipeline(Readable.from([payload.subarray(0, 100_000), payload.subarray(100_000)]), writable);
        const [c] = await sql`select count(*)::int as n, sum(id)::bigint as s from pjs_copy`;
        assert.equal(c.n, n);
        assert.equal(String(c.s), String((n * (n + 1)) / 2));
        const readable = await sql`copy (select id, v from pjs_copy order by id) to stdout`.readable();
        const out: Buffer[] = [];
        for await (const chunk of readable) out.push(Buffer.from(chunk as Buffer));
        assert.equal(md5(Buffer.concat(out)), md5(payload));
        const [after] = await sql`select 1 as one`;
        assert.equal(after.one, 1);
      });

      test('200 concurrent queries through a small gateway pool all succeed', async () => {
        // Transaction mode: 10 client connections share 2 server connections. Session mode
        // ties each client connection to a server connection, so the client pool matches it.
        const max = mode === 'transaction' ? 10 : 2;
        const small = postgres(stack.url('app', 'two'), { max, onnotice: () => undefined, connect_timeout: 10 });
        try {
          const results = await Promise.all(
            Array.from({ length: 200 }, (_, i) => small`select ${i}::int as i, pg_backend_pid() as pid, pg_sleep(0.005)`.then((r) => r[0])),
          );
          assert.deepEqual(results.map((r) => r.i), Array.from({ length: 200 }, (_, i) => i));
          const pids = new Set(results.map((r) => r.pid));
          assert.ok(pids.size <= 2, `at most 2 server connections used, saw ${pids.size}`);
          const servers = await stack.pg.query<{ n: number }>(
            `select count(*)::int as n from pg_stat_activity where usename = 'app' and backend_type = 'client backend' and pid = any($1::int[])`,
            [[...pids]],
          );
          assert.ok(servers[0].n <= 2);
        } finally {
          await small.end({ timeout: 2 });
        }
      });
    });
  });
}
