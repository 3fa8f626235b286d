/**
 * No session state leaks between clients that share a server connection, in both pool modes.
 *
 * Each pool-mode suite runs a gateway with `pool.default_size: 1`, so two clients of the same
 * user are forced onto the same server connection (asserted through pg_backend_pid()). For each
 * kind of session state, client A sets it and goes away, then client B must see a pristine
 * session: the specific check of the state plus a fingerprint of the whole session (settings,
 * role, SQL prepared statements, cursors, advisory locks, LISTEN channels, temp relations,
 * dblink connections) compared with the fingerprint of a fresh session taken before any test ran.
 *
 * In transaction mode each state is also tested with A still connected: A's transaction ends,
 * B immediately runs on the (only) server connection; A must be pinned to its server, so B only
 * gets it once A disconnected and the server was reset, and A keeps seeing its own state.
 */
import { test, describe, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { startStack, USERS, type Stack } from './helpers/stack.js';

type PoolMode = 'transaction' | 'session';
type ClientExtras = { application_name?: string; options?: string };

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Clients still open; closed after each test so a failed test cannot hold the only server. */
const openClients = new Set<pg.Client>();
afterEach(async () => {
  await Promise.all([...openClients].map((c) => c.end().catch(() => undefined)));
  openClients.clear();
});

async function connect(stack: Stack, extras: ClientExtras = {}): Promise<pg.Client> {
  const c = new pg.Client({ ...stack.clientConfig('app'), ...extras });
  c.on('error', () => undefined);
  openClients.add(c);
  c.on('end', () => openClients.delete(c));
  await c.connect();
  return c;
}

async function one<T = any>(c: pg.Client, sql: string, values?: unknown[]): Promise<T> {
  const r = await c.query(sql, values as any[] | undefined);
  return r.rows[0] as T;
}

async function backendPid(c: pg.Client): Promise<number> {
  return (await one<{ pid: number }>(c, 'select pg_backend_pid() as pid')).pid;
}

/** Everything a session can carry over, in one query (so it runs in one transaction). */
const FINGERPRINT_SQL = `
  select pg_backend_pid() as pid,
         current_user::text as current_user,
         session_user::text as session_user,
         (select count(*)::int from pg_prepared_statements where from_sql) as sql_prepared,
         (select count(*)::int from pg_cursors) as cursors,
         (select count(*)::int from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()) as advisory_locks,
         (select count(*)::int from pg_listening_channels()) as listening,
         (select count(*)::int from pg_class where relnamespace = pg_my_temp_schema()) as temp_relations,
         coalesce(array_length(dblink_get_connections(), 1), 0) as dblink_connections,
         (select coalesce(json_object_agg(name, setting order by name), '{}'::json)
            from pg_settings where name not like '%.%') as settings`;

interface Fingerprint {
  pid: number;
  current_user: string;
  session_user: string;
  sql_prepared: number;
  cursors: number;
  advisory_locks: number;
  listening: number;
  temp_relations: number;
  dblink_connections: number;
  settings: Record<string, string>;
}

async function fingerprint(c: pg.Client): Promise<Fingerprint> {
  return one<Fingerprint>(c, FINGERPRINT_SQL);
}

function assertPristine(fp: Fingerprint, baseline: Fingerprint, what: string): void {
  const { pid: _p, settings, ...rest } = fp;
  const { pid: _b, settings: baseSettings, ...baseRest } = baseline;
  assert.deepEqual(rest, baseRest, `${what}: session objects differ from a fresh session`);
  const changed = Object.keys({ ...settings, ...baseSettings })
    .filter((k) => settings[k] !== baseSettings[k])
    .map((k) => `${k}: ${JSON.stringify(baseSettings[k])} -> ${JSON.stringify(settings[k])}`);
  assert.deepEqual(changed, [], `${what}: settings differ from a fresh session`);
}

/** One kind of session state. */
interface StateCase {
  /** A leaves the state behind (in its own transaction(s)). */
  set(a: pg.Client): Promise<void>;
  /** A still has the state (proves `set` worked, and pinning while A stays). */
  own(a: pg.Client): Promise<void>;
  /** B, another connection of the same user on the same server connection, must not see it. */
  clean(b: pg.Client): Promise<void>;
}

for (const mode of ['transaction', 'session'] as const satisfies readonly PoolMode[]) {
  describe(`session state isolation, pool mode ${mode}, one server connection`, () => {
    let stack: Stack;
    let baseline: Fingerprint;

    before(async () => {
      stack = await startStack({ pool: { mode, default_size: 1, wait_timeout_ms: 5000 } });
      await stack.pg.query('GRANT alice TO app');
      await stack.pg.query('CREATE SCHEMA a_schema AUTHORIZATION app');
      await stack.pg.query('CREATE TABLE a_schema.only_a (x int); INSERT INTO a_schema.only_a VALUES (7); GRANT SELECT ON a_schema.only_a TO app');
      await stack.pg.query('CREATE TABLE public.iso_writes (x int); GRANT INSERT, SELECT ON public.iso_writes TO app');
      await stack.pg.query('CREATE EXTENSION dblink');
      const fresh = await connect(stack);
      baseline = await fingerprint(fresh);
      await fresh.end();
      assert.equal(baseline.current_user, 'app');
      assert.equal(baseline.settings.search_path, '"$user", public');
      assert.equal(baseline.settings.application_name, '');
    });
    after(() => stack?.stop());

    /**
     * The isolation protocol for one kind of state:
     *  1. A sets it and disconnects; a new client B gets A's server connection and sees nothing.
     *  2. (transaction mode) A and B are both connected; A's transaction ends with A still
     *     connected; B runs at once. B must not see the state; A must still have it.
     */
    async function checkIsolation(c: StateCase): Promise<void> {
      // 1. A disconnects.
      {
        const a = await connect(stack);
        const pidA = await backendPid(a);
        await c.set(a);
        await c.own(a);
        await a.end();
        const b = await connect(stack);
        assert.equal(await backendPid(b), pidA, 'B must get the server connection A used (pool size 1)');
        await c.clean(b);
        assertPristine(await fingerprint(b), baseline, 'after A disconnected');
        await b.end();
      }
      if (mode !== 'transaction') return;
      // 2. A's transaction is over but A stays connected.
      {
        const a = await connect(stack);
        const b = await connect(stack);
        const pidA = await backendPid(a);
        await c.set(a);
        const bDone = (async () => {
          await c.clean(b);
          return fingerprint(b);
        })();
        bDone.catch(() => undefined);
        await sleep(100);
        for (let i = 0; i < 3; i++) {
          await c.own(a);
          assert.equal(await backendPid(a), pidA, 'A keeps its server connection while it has session state');
        }
        await a.end();
        const fp = await bDone;
        assert.equal(fp.pid, pidA, 'B must get the server connection A used (pool size 1)');
        assertPristine(fp, baseline, 'after A ended its transaction (A still connected)');
        await b.end();
      }
    }

    test('SET statement_timeout', () =>
      checkIsolation({
        set: async (a) => {
          await a.query(`SET statement_timeout = '1234ms'`);
        },
        own: async (a) => assert.equal((await one(a, 'SHOW statement_timeout')).statement_timeout, '1234ms'),
        clean: async (b) => assert.equal((await one(b, 'SHOW statement_timeout')).statement_timeout, '0'),
      }));

    test('SET ROLE', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('SET ROLE alice');
        },
        own: async (a) => assert.deepEqual(await one(a, 'select current_user::text as cu, session_user::text as su'), { cu: 'alice', su: 'app' }),
        clean: async (b) => {
          assert.deepEqual(await one(b, 'select current_user::text as cu, session_user::text as su'), { cu: 'app', su: 'app' });
          assert.equal((await one(b, 'SHOW role')).role, 'none');
        },
      }));

    test('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY');
        },
        own: async (a) => {
          await assert.rejects(a.query('insert into iso_writes values (0)'), { code: '25006' });
        },
        clean: async (b) => {
          assert.equal((await one(b, 'SHOW default_transaction_read_only')).default_transaction_read_only, 'off');
          await b.query('insert into iso_writes values (1)');
        },
      }));

    test('search_path', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('SET search_path TO a_schema');
        },
        own: async (a) => assert.equal((await one(a, 'select x from only_a')).x, 7),
        clean: async (b) => {
          assert.equal((await one(b, 'SHOW search_path')).search_path, '"$user", public');
          await assert.rejects(b.query('select x from only_a'), { code: '42P01' });
        },
      }));

    test('temporary table', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('CREATE TEMP TABLE tmp_a (x int)');
          await a.query('INSERT INTO tmp_a VALUES (1), (2)');
        },
        own: async (a) => assert.equal((await one(a, 'select count(*)::int as n from pg_temp.tmp_a')).n, 2),
        clean: async (b) => {
          assert.equal((await one(b, `select to_regclass('pg_temp.tmp_a') as r`)).r, null);
          assert.equal((await one(b, `select count(*)::int as n from pg_class where relname = 'tmp_a'`)).n, 0);
          await assert.rejects(b.query('select * from tmp_a'), { code: '42P01' });
        },
      }));

    test('temporary objects created under a pg_temp-qualified name (no TEMP keyword)', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('CREATE TABLE pg_temp.qual_tmp (x int)');
          await a.query('INSERT INTO pg_temp.qual_tmp VALUES (1)');
          await a.query('CREATE VIEW pg_temp.qual_view AS SELECT 1 AS one');
          await a.query(`CREATE FUNCTION pg_temp.qual_fn() RETURNS int LANGUAGE sql AS 'select 42'`);
        },
        own: async (a) => {
          const r = await one(a, 'select (select count(*)::int from qual_tmp) as n, (select one from qual_view) as v, pg_temp.qual_fn() as f');
          assert.deepEqual(r, { n: 1, v: 1, f: 42 });
        },
        clean: async (b) => {
          const r = await one(b, `select to_regclass('pg_temp.qual_tmp') as t, to_regclass('pg_temp.qual_view') as v, to_regprocedure('pg_temp.qual_fn()') as f`);
          assert.deepEqual(r, { t: null, v: null, f: null });
          await assert.rejects(b.query('select * from qual_tmp'), { code: '42P01' });
        },
      }));

    test('SQL-level PREPARE', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('PREPARE sql_stmt (int) AS SELECT $1 + 1 AS n');
        },
        own: async (a) => assert.equal((await one(a, 'EXECUTE sql_stmt (41)')).n, 42),
        clean: async (b) => {
          assert.equal((await one(b, 'select count(*)::int as n from pg_prepared_statements where from_sql')).n, 0);
          await assert.rejects(b.query('EXECUTE sql_stmt (1)'), { code: '26000' });
        },
      }));

    test('cursor WITH HOLD', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 100) g');
        },
        own: async (a) => {
          assert.equal((await one(a, 'select count(*)::int as n from pg_cursors')).n, 1);
          assert.equal(typeof (await one(a, 'FETCH 1 FROM held')).g, 'number');
        },
        clean: async (b) => {
          assert.equal((await one(b, 'select count(*)::int as n from pg_cursors')).n, 0);
          await assert.rejects(b.query('FETCH 1 FROM held'), { code: '34000' });
        },
      }));

    test('session advisory lock', () =>
      checkIsolation({
        set: async (a) => {
          await a.query('select pg_advisory_lock(42)');
        },
        own: async (a) => {
          const n = (await one(a, `select count(*)::int as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid() and granted`)).n;
          assert.equal(n, 1);
          // Another session (not through the gateway) cannot take it.
          const [r] = await stack.pg.query<{ ok: boolean }>('select pg_try_advisory_lock(42) as ok');
          assert.equal(r.ok, false);
        },
        clean: async (b) => {
          // Checked before B takes it: in the same server session, a leaked lock would be re-entrant.
          const n = (await one(b, `select count(*)::int as n from pg_locks where locktype = 'advisory'`)).n;
          assert.equal(n, 0, 'no advisory lock may be held by anyone');
          const [r] = await stack.pg.query<{ ok: boolean }>('select pg_try_advisory_lock(42) as ok');
          assert.equal(r.ok, true);
          assert.equal((await one(b, 'select pg_try_advisory_lock(42) as ok')).ok, true);
          assert.equal((await one(b, 'select pg_advisory_unlock(42) as ok')).ok, true);
        },
      }));

    test('LISTEN', () => {
      const waitForNotification = (c: pg.Client, channel: string, ms: number) =>
        new Promise<pg.Notification | null>((resolve) => {
          const t = setTimeout(() => {
            c.off('notification', on);
            resolve(null);
          }, ms);
          const on = (m: pg.Notification) => {
            if (m.channel !== channel) return;
            clearTimeout(t);
            c.off('notification', on);
            resolve(m);
          };
          c.on('notification', on);
        });
      return checkIsolation({
        set: async (a) => {
          await a.query('LISTEN ch');
        },
        own: async (a) => {
          const got = waitForNotification(a, 'ch', 2000);
          await stack.pg.query(`NOTIFY ch, 'for-a'`);
          const m = await got;
          assert.equal(m?.payload, 'for-a', 'A (still listening) gets the notification');
        },
        clean: async (b) => {
          const seen: pg.Notification[] = [];
          b.on('notification', (m) => seen.push(m));
          assert.deepEqual((await b.query('select pg_listening_channels() as ch')).rows, []);
          await stack.pg.query(`NOTIFY ch, 'not-for-b'`);
          await sleep(150);
          // A query flushes anything the server had queued for this session.
          assert.deepEqual((await b.query('select pg_listening_channels() as ch')).rows, []);
          assert.deepEqual(seen, [], 'B did not LISTEN and must not get notifications');
        },
      });
    });

    test('dblink connections (named and unnamed, logged in as another role)', () => {
      const connstr = `host=${stack.pg.host} port=${stack.pg.port} dbname=postgres user=alice password=${USERS.alice}`;
      return checkIsolation({
        set: async (a) => {
          await a.query(`select dblink_connect('tg_link', $1)`, [connstr]);
          await a.query(`select dblink_connect($1)`, [connstr]);
        },
        own: async (a) => {
          assert.deepEqual((await one(a, 'select dblink_get_connections() as c')).c, ['tg_link']);
          assert.equal((await one(a, `select u from dblink('tg_link', 'select current_user::text') as t(u text)`)).u, 'alice');
          assert.equal((await one(a, `select dblink_exec('set application_name = ''x''') as r`)).r, 'SET');
        },
        clean: async (b) => {
          assert.equal((await one(b, 'select dblink_get_connections() as c')).c, null);
          // Without an unnamed connection, the one-argument form has nothing to run on.
          await assert.rejects(b.query(`select dblink_exec('select 1')`), /connection not available/);
        },
      });
    });

    test('set_config(..., false)', () =>
      checkIsolation({
        set: async (a) => {
          await a.query(`select set_config('work_mem', '7777kB', false), set_config('tg.secret', 'from-A', false)`);
        },
        own: async (a) => {
          assert.deepEqual(await one(a, `select current_setting('work_mem') as wm, current_setting('tg.secret', true) as s`), {
            wm: '7777kB',
            s: 'from-A',
          });
        },
        clean: async (b) => {
          const r = await one(b, `select current_setting('work_mem') as wm, current_setting('tg.secret', true) as s`);
          assert.notEqual(r.wm, '7777kB');
          assert.equal((await one(b, `select setting from pg_settings where name = 'work_mem'`)).setting, baseline.settings.work_mem);
          // A reset placeholder reads as '' (PostgreSQL keeps the name); never A's value.
          assert.ok(r.s === null || r.s === '', `tg.secret leaked: ${r.s}`);
        },
      }));

    test('set_config through a Unicode-escaped identifier (U&"\\0073et_config")', () =>
      checkIsolation({
        set: async (a) => {
          await a.query(String.raw`select U&"\0073et_config"('work_mem', '6666kB', false)`);
        },
        own: async (a) => assert.equal((await one(a, `select current_setting('work_mem') as wm`)).wm, '6666kB'),
        clean: async (b) => {
          assert.equal((await one(b, `select setting from pg_settings where name = 'work_mem'`)).setting, baseline.settings.work_mem);
        },
      }));

    test('startup parameters (application_name, options -c search_path)', async () => {
      const aExtras: ClientExtras = { application_name: 'A-app', options: '-c search_path=a_schema' };
      const checkA = async (a: pg.Client) => {
        const r = await one(a, `select current_setting('application_name') as app, current_setting('search_path') as sp, (select x from only_a) as x`);
        assert.deepEqual(r, { app: 'A-app', sp: 'a_schema', x: 7 });
      };
      const checkB = async (b: pg.Client) => {
        const r = await one(b, `select current_setting('application_name') as app, current_setting('search_path') as sp`);
        assert.deepEqual(r, { app: '', sp: '"$user", public' });
        await assert.rejects(b.query('select x from only_a'), { code: '42P01' });
        assertPristine(await fingerprint(b), baseline, 'B after A with startup parameters');
      };

      const a = await connect(stack, aExtras);
      const pidA = await backendPid(a);
      if (mode === 'transaction') {
        // Interleaved on the single server connection: each gets its own parameters every time.
        const b = await connect(stack);
        for (let i = 0; i < 4; i++) {
          await checkA(a);
          await a.query('begin');
          await checkA(a);
          await a.query('commit');
          assert.equal(await backendPid(b), pidA);
          await checkB(b);
        }
        await Promise.all([checkA(a), checkB(b), checkA(a), checkB(b)]);
        await a.end();
        await checkB(b);
        await b.end();
      } else {
        for (let i = 0; i < 4; i++) await checkA(a);
        await a.end();
      }
      const b = await connect(stack);
      assert.equal(await backendPid(b), pidA);
      await checkB(b);
      await b.end();
      // A again: it gets its parameters back on the same server connection.
      const a2 = await connect(stack, aExtras);
      await checkA(a2);
      // A2 leaves session state, so the server is reset when it leaves (always, in session mode).
      await a2.query('CREATE TEMP TABLE a2_tmp (x int)');
      await checkA(a2);
      await a2.end();
      // Right after that reset, a client with the same startup parameters must still get them.
      const a3 = await connect(stack, aExtras);
      assert.equal(await backendPid(a3), pidA);
      await checkA(a3);
      await a3.query('begin');
      await checkA(a3);
      await a3.query('commit');
      await a3.end();
      const b2 = await connect(stack);
      await checkB(b2);
      await b2.end();
    });

    if (mode === 'transaction') {
      test('DISCARD ALL / DEALLOCATE ALL from one client do not break prepared statements of others', async () => {
        const a = await connect(stack);
        const b = await connect(stack);
        const c = await connect(stack);
        const pid = await backendPid(a);
        const qa = (v: number) => ({ name: 'stmt_a', text: 'select $1::int + 1000 as n', values: [v] });
        const qb = (v: number) => ({ name: 'stmt_b', text: `select 'b-' || $1::text as s`, values: [v] });
        const qc = (v: number) => ({ name: 'stmt_c', text: 'select $1::int * 3 as n', values: [v] });
        const useAll = async (round: number) => {
          assert.equal((await a.query(qa(round))).rows[0].n, 1000 + round);
          assert.equal((await b.query(qb(round))).rows[0].s, `b-${round}`);
          assert.equal((await c.query(qc(round))).rows[0].n, 3 * round);
        };
        await useAll(1);
        for (const [i, sql] of ['DISCARD ALL', 'DEALLOCATE ALL', 'BEGIN; DEALLOCATE ALL; COMMIT', 'DISCARD ALL'].entries()) {
          await c.query(sql);
          // The gateway's copies on the (only) server are gone: they must be prepared again on demand.
          assert.equal((await one(b, 'select count(*)::int as n from pg_prepared_statements')).n, 0, `${sql} emptied the server`);
          await useAll(10 + i);
          await useAll(20 + i);
          assert.equal(await backendPid(b), pid, 'all three share one server connection');
        }
        // A fresh client using the same statement names and SQL works too.
        const d = await connect(stack);
        assert.equal((await d.query(qa(5))).rows[0].n, 1005);
        await d.query('DISCARD ALL');
        assert.equal((await d.query(qa(6))).rows[0].n, 1006);
        await useAll(99);
        for (const x of [a, b, c, d]) await x.end();
      });
    }
  });
}

describe('transaction mode with two server connections', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({ pool: { mode: 'transaction', default_size: 2, wait_timeout_ms: 5000 } });
  });
  after(() => stack?.stop());

  test('a client with session state keeps its server and sees its state; others use the other server', async () => {
    const a = await connect(stack);
    const b = await connect(stack);
    await a.query(`SET statement_timeout = '4321ms'`);
    await a.query('CREATE TEMP TABLE pinned_t (x int)');
    await a.query('INSERT INTO pinned_t VALUES (1)');
    const pidA = await backendPid(a);
    const pidsB = new Set<number>();
    for (let i = 0; i < 8; i++) {
      const stepA = async () => {
        await a.query('begin');
        await a.query('insert into pinned_t values ($1)', [i + 2]);
        const r = await one(a, `select pg_backend_pid() as pid, current_setting('statement_timeout') as st, (select count(*)::int from pinned_t) as n`);
        await a.query('commit');
        assert.deepEqual(r, { pid: pidA, st: '4321ms', n: i + 2 });
      };
      const stepB = async () => {
        const r = await one(b, `select pg_backend_pid() as pid, current_setting('statement_timeout') as st, to_regclass('pg_temp.pinned_t') as t`);
        assert.notEqual(r.pid, pidA, 'B must not run on the server A is pinned to');
        assert.deepEqual({ st: r.st, t: r.t }, { st: '0', t: null });
        pidsB.add(r.pid);
      };
      await Promise.all([stepA(), stepB(), stepB()]);
    }
    assert.equal(pidsB.size, 1, 'B used the other server connection');
    await a.end();
    // A's server is reset and available again: with both servers busy at once, one of B and C
    // runs on it, and neither sees anything of A.
    const c = await connect(stack);
    const rows = await Promise.all(
      [b, c].map((x) =>
        one(
          x,
          `select pg_backend_pid() as pid, current_setting('statement_timeout') as st, to_regclass('pg_temp.pinned_t') as t,
                  (select count(*)::int from pg_class where relnamespace = pg_my_temp_schema()) as n, pg_sleep(0.1)::text as _`,
        ),
      ),
    );
    assert.ok(rows.some((r) => r.pid === pidA), "A's former server connection is in use again");
    for (const r of rows) assert.deepEqual({ st: r.st, t: r.t, n: r.n }, { st: '0', t: null, n: 0 });
    await b.end();
    await c.end();
  });

  test('named prepared statements across server connections: same and different SQL, same and different names', async () => {
    const a = await connect(stack);
    const b = await connect(stack);
    const shared = (v: number) => ({ name: 'shared', text: 'select $1::int * 2 as v, pg_backend_pid() as pid', values: [v] });
    const own = (who: string) => (v: number) => ({ name: `own_${who}`, text: `select $2::text || ':' || $1::int as v, pg_backend_pid() as pid`, values: [v, who] });
    // The same client-side name, different SQL per client.
    const clash = (who: string) => (v: number) =>
      who === 'a'
        ? { name: 'clash', text: `select 'A-clash-' || $1::int as v, pg_backend_pid() as pid`, values: [v] }
        : { name: 'clash', text: `select $1::int - 1000000 as v, 'B' as who, pg_backend_pid() as pid`, values: [v] };
    const clients = { a, b } as const;
    const pids: Record<string, Set<number>> = {};
    const seen = (key: string, pid: number) => (pids[key] ??= new Set()).add(pid);

    const run = async (who: 'a' | 'b', i: number) => {
      const c = clients[who];
      const r1 = (await c.query(shared(i))).rows[0];
      assert.equal(r1.v, i * 2);
      seen(`${who}:shared`, r1.pid);
      const r2 = (await c.query(own(who)(i))).rows[0];
      assert.equal(r2.v, `${who}:${i}`);
      seen(`${who}:own`, r2.pid);
      const r3 = (await c.query(clash(who)(i))).rows[0];
      if (who === 'a') assert.deepEqual({ v: r3.v }, { v: `A-clash-${i}` });
      else assert.deepEqual({ v: r3.v, who: r3.who }, { v: i - 1000000, who: 'B' });
      seen(`${who}:clash`, r3.pid);
    };

    for (let i = 0; i < 40; i++) {
      switch (i % 4) {
        case 0: // both at once: they need both server connections
          await Promise.all([run('a', i), run('b', i)]);
          break;
        case 1: // A holds a server in a transaction; B must use the other one
          await a.query('begin');
          await run('b', i);
          await run('a', i);
          await a.query('commit');
          break;
        case 2: // the other way round
          await b.query('begin');
          await run('a', i);
          await run('b', i);
          await b.query('commit');
          break;
        default:
          await run('b', i);
          await run('a', i);
      }
    }
    for (const key of ['a:shared', 'a:own', 'a:clash', 'b:shared', 'b:own', 'b:clash']) {
      assert.equal(pids[key]?.size, 2, `${key} ran on both server connections (prepared on demand)`);
    }
    // Client-side names never reach the servers: they only hold the gateway's per-SQL names.
    await Promise.all(
      [a, b].map(async (c) => {
        const r = await c.query(`select name from pg_prepared_statements where name !~ '^tg_[0-9a-f]+$'`);
        assert.deepEqual(r.rows, []);
      }),
    );
    await a.end();
    await b.end();
  });
});
