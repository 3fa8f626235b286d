/**
 * libpq clients through the gateway, in both pool modes: psql (-c, -f scripts with \copy,
 * transactions, ON_ERROR_STOP, \d) and pgbench (simple, extended and prepared protocols).
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startStack, USERS, type Stack } from './helpers/stack.js';
import { interruptPsqlSleep, run } from './helpers/psql.js';

const MODES = ['transaction', 'session'] as const;


for (const mode of MODES) {
  describe(`psql and pgbench through the gateway (${mode} mode)`, () => {
    let stack: Stack;
    let dir: string;

    /** psql as `app` through the gateway: no psqlrc, unaligned tuples-only output. */
    const psql = (args: string[], user = 'app') =>
      run(
        'psql',
        ['-X', '-q', '-A', '-t', '-h', '127.0.0.1', '-p', String(stack.port), '-U', user, '-d', 'postgres', ...args],
        { PGPASSWORD: (USERS as Record<string, string>)[user] ?? '', PGAPPNAME: 'tg-psql-test' },
        20_000,
      );

    before(async () => {
      stack = await startStack({ pool: { mode, default_size: 8, wait_timeout_ms: 10_000 } });
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-psql-'));
    });
    after(async () => {
      await stack?.stop();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    test('psql -c runs queries', async () => {
      const r = await psql(['-c', 'select 1 + 1', '-c', 'select current_user, current_database()', '-c', `select current_setting('application_name')`]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split('\n'), ['2', 'app|postgres', 'tg-psql-test']);
      const v = await psql(['-c', 'show server_version_num']);
      assert.ok(Number(v.stdout.trim()) >= 180000, `server_version_num ${v.stdout}`);
    });

    test('PGOPTIONS -c settings apply like on a direct connection (list values stay lists)', async () => {
      const r = await run(
        'psql',
        ['-X', '-A', '-t', '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', '-d', 'postgres', '-c', 'show search_path', '-c', 'show work_mem', '-c', 'select 1 from pg_class limit 1'],
        { PGPASSWORD: USERS.app, PGOPTIONS: '-c search_path=pg_catalog,public -c work_mem=3MB' },
        20_000,
      );
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split('\n'), ['pg_catalog,public', '3MB', '1']);
    });

    test('SIGINT to psql cancels the running query through the gateway (libpq cancel)', async () => {
      // psql waits for the query to run on the server, then is interrupted like Ctrl-C does.
      const { code, stderr, cancelMs } = await interruptPsqlSleep(['-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', '-d', 'postgres'], USERS.app, stack.pg);
      assert.ok(cancelMs < 3000, 'cancelled promptly');
      assert.equal(code, 1, stderr);
      assert.match(stderr, /canceling statement due to user request/);
    });

    test('psql -f script: \\copy from/to a file, transactions, results', async () => {
      const input = path.join(dir, `in-${mode}.csv`);
      const output = path.join(dir, `out-${mode}.csv`);
      const rows: string[] = [];
      for (let i = 1; i <= 5000; i++) rows.push(`${i},"name ${i}, with comma"`);
      fs.writeFileSync(input, rows.join('\n') + '\n');
      const extra = path.join(dir, `extra-${mode}.csv`);
      fs.writeFileSync(extra, '9001,a\n9002,b\n');
      const script = path.join(dir, `script-${mode}.sql`);
      fs.writeFileSync(
        script,
        [
          '\\set ON_ERROR_STOP 1',
          'drop table if exists ps_t;',
          'create table ps_t (id int primary key, v text not null);',
          `\\copy ps_t from '${input}' with (format csv)`,
          'begin;',
          `insert into ps_t values (5001, 'in a transaction');`,
          `update ps_t set v = upper(v) where id <= 3;`,
          'commit;',
          'begin;',
          'delete from ps_t;',
          'rollback;',
          // \copy inside a transaction block that is rolled back: nothing stays.
          'begin;',
          `\\copy ps_t from '${extra}' with (format csv)`,
          `select 'in tx', count(*) from ps_t;`,
          'rollback;',
          `select 'count', count(*), sum(id) from ps_t;`,
          `select 'upper', v from ps_t where id = 2;`,
          `\\copy (select id, v from ps_t where id <= 5000 order by id) to '${output}' with (format csv)`,
          `select 'done';`,
          '',
        ].join('\n'),
      );
      const r = await psql(['-f', script]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split('\n'), ['in tx|5003', 'count|5001|12507501', 'upper|NAME 2, WITH COMMA', 'done']);
      const back = fs.readFileSync(output, 'utf8').trim().split('\n');
      assert.equal(back.length, 5000);
      assert.equal(back[0], '1,"NAME 1, WITH COMMA"');
      assert.equal(back[4999], '5000,"name 5000, with comma"');
      assert.deepEqual(back.slice(3), rows.slice(3));
    });

    test('psql ON_ERROR_STOP stops at the error and shows SQLSTATE and message', async () => {
      const script = path.join(dir, `err-${mode}.sql`);
      fs.writeFileSync(script, ["select 'before';", 'select * from no_such_table;', "select 'after';", ''].join('\n'));
      const r = await psql(['-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose', '-f', script]);
      assert.equal(r.code, 3, `psql exits with 3 when a script stops on error; stderr: ${r.stderr}`);
      assert.equal(r.stdout.trim(), 'before');
      assert.match(r.stderr, /ERROR: {2}42P01: relation "no_such_table" does not exist/);
      // Default verbosity: message without the code; -c errors exit with 1.
      const r2 = await psql(['-v', 'ON_ERROR_STOP=1', '-c', 'select 1/0']);
      assert.equal(r2.code, 1);
      assert.match(r2.stderr, /ERROR: {2}division by zero/);
      // An error inside a transaction block, then rollback, in one session.
      const r3 = await psql(['-c', 'begin', '-c', 'select 1/0', '-c', 'rollback', '-c', "select 'recovered'"]);
      assert.match(r3.stderr, /division by zero/);
      assert.match(r3.stdout, /recovered/);
    });

    test('psql \\d describes tables (catalog queries)', async () => {
      const setup = await psql([
        '-v',
        'ON_ERROR_STOP=1',
        '-c',
        'drop table if exists ps_d',
        '-c',
        `create table ps_d (id bigint primary key, name text not null default 'x', created timestamptz)`,
        '-c',
        'create index ps_d_name on ps_d (name)',
      ]);
      assert.equal(setup.code, 0, setup.stderr);
      const r = await run(
        'psql',
        ['-X', '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', '-d', 'postgres', '-c', '\\d ps_d', '-c', '\\dt', '-c', '\\di'],
        { PGPASSWORD: USERS.app },
        20_000,
      );
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /Table "public\.ps_d"/);
      assert.match(r.stdout, /\bid\s+\|\s*bigint\s+\|\s*\|\s*not null/);
      assert.match(r.stdout, /\bname\s+\|\s*text\s+\|\s*\|\s*not null\s*\|\s*'x'::text/);
      assert.match(r.stdout, /"ps_d_pkey" PRIMARY KEY, btree \(id\)/);
      assert.match(r.stdout, /"ps_d_name" btree \(name\)/);
      assert.match(r.stdout, /List of relations/);
      assert.match(r.stdout, /public \| ps_d\s+\| table \| app/);
      assert.match(r.stdout, /ps_d_name\s+\| index \| app\s+\| ps_d/);
      assert.equal(r.stderr, '');
    });

    describe('pgbench', () => {
      before(async () => {
        // Initialise directly on PostgreSQL as the superuser, then let app read the tables.
        const init = await run(
          'pgbench',
          ['-i', '-s', '1', '-q', '-h', stack.pg.host, '-p', String(stack.pg.port), '-U', stack.pg.superuser, 'postgres'],
          { PGPASSWORD: stack.pg.superuserPassword },
          60_000,
        );
        assert.equal(init.code, 0, init.stderr);
        await stack.pg.query('grant select on all tables in schema public to app');
      });

      for (const protocol of ['simple', 'extended', 'prepared'] as const) {
        test(`pgbench -S -M ${protocol} completes with 0 failed transactions`, async () => {
          const r = await run(
            'pgbench',
            ['-n', '-S', '-T', '3', '-c', '4', '-j', '2', '-M', protocol, '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', 'postgres'],
            { PGPASSWORD: USERS.app },
            30_000,
          );
          assert.equal(r.code, 0, `pgbench failed:\n${r.stdout}\n${r.stderr}`);
          const processed = /number of transactions actually processed: (\d+)/.exec(r.stdout);
          const failed = /number of failed transactions: (\d+)/.exec(r.stdout);
          const tps = /tps = ([\d.]+)/.exec(r.stdout);
          assert.ok(processed && Number(processed[1]) > 0, r.stdout);
          assert.ok(failed, `no failed-transactions line in:\n${r.stdout}`);
          assert.equal(Number(failed[1]), 0, r.stdout);
          assert.ok(tps && Number(tps[1]) > 0, r.stdout);
          assert.doesNotMatch(r.stderr, /error|FATAL/i);
        });
      }

      test('pgbench -C (a new connection per transaction) leaves no sessions behind', async () => {
        const r = await run(
          'pgbench',
          ['-n', '-S', '-C', '-t', '25', '-c', '4', '-j', '2', '-M', 'extended', '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', 'postgres'],
          { PGPASSWORD: USERS.app },
          60_000,
        );
        assert.equal(r.code, 0, `pgbench failed:\n${r.stdout}\n${r.stderr}`);
        assert.match(r.stdout, /number of transactions actually processed: 100\/100/);
        assert.match(r.stdout, /number of failed transactions: 0 /);
        for (let i = 0; i < 100 && stack.gw.clientCount > 0; i++) await new Promise((res) => setTimeout(res, 20));
        assert.equal(stack.gw.clientCount, 0, 'every client session is gone after pgbench disconnects');
      });

      test('pgbench read-write (default TPC-B-like script, -M prepared) completes', async () => {
        await stack.pg.query('grant select, insert, update on all tables in schema public to app');
        const r = await run(
          'pgbench',
          ['-n', '-t', '50', '-c', '4', '-j', '2', '-M', 'prepared', '-h', '127.0.0.1', '-p', String(stack.port), '-U', 'app', 'postgres'],
          { PGPASSWORD: USERS.app },
          30_000,
        );
        assert.equal(r.code, 0, `pgbench failed:\n${r.stdout}\n${r.stderr}`);
        assert.match(r.stdout, /number of transactions actually processed: 200\/200/);
        assert.match(r.stdout, /number of failed transactions: 0 /);
      });
    });
  });
}
