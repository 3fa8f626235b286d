/**
 * The user's story of trusted sessions with real psql (libpq) through trustgate, in both pool
 * modes: a security administrator grants and revokes CONNECT THROUGH rules with `psql -c` / `-f`;
 * the middle tier `app_tier` runs psql scripts with query bands FOR TRANSACTION and FOR SESSION,
 * trusted requests under TRUST ONLY, and sees refusals with their SQLSTATE.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import { setupTrustWorld, STORY_GRANTS, TRUST_USERS } from './helpers/trust.js';
import { run } from './helpers/psql.js';

const MODES = ['transaction', 'session'] as const;

/** The union role trustgate creates for bob_from_web's rule (WITH ROLE web_reader, web_writer). */
const BOB_UNION = `tg_union_${createHash('sha256').update('web_reader,web_writer').digest('hex').slice(0, 16)}`;


const lines = (text: string): string[] => text.trim().split('\n');

/** psql's ERROR lines (VERBOSITY verbose: `ERROR:  <SQLSTATE>: <message>`), in order, without the script prefix. */
const errorLines = (stderr: string): string[] =>
  stderr
    .split('\n')
    .filter((l) => /\bERROR: {2}/.test(l))
    .map((l) => l.replace(/^psql:[^:]+:\d+: /, ''));

for (const mode of MODES) {
  describe(`trusted sessions with psql (${mode} mode)`, () => {
    let stack: Stack;
    let dir: string;
    let trustKey = '';
    /** PostgreSQL's own log (log_statement = all). */
    const serverLog: string[] = [];

    /** psql as `user` through trustgate: no psqlrc, unaligned tuples-only output, command tags shown. */
    const psql = (user: keyof typeof TRUST_USERS, args: string[]) =>
      run(
        'psql',
        ['-X', '-A', '-t', '-h', '127.0.0.1', '-p', String(stack.port), '-U', user, '-d', 'postgres', ...args],
        { PGPASSWORD: TRUST_USERS[user], PGAPPNAME: 'tg-trusted-psql' },
        20_000,
      );
    const script = (name: string, text: string): string => {
      const file = path.join(dir, `${name}-${mode}.sql`);
      fs.writeFileSync(file, text);
      return file;
    };

    before(async () => {
      const db = await preparePostgres({ settings: { max_connections: 300, log_statement: 'all' }, log: (line) => serverLog.push(line) });
      await setupTrustWorld(db);
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 2 } });
      stack = stackOf(db, gw, logs, true);
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-trusted-psql-'));
    });
    after(async () => {
      await stack?.stop();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    test('secadm grants the story rules with psql -f; psql shows GRANT', async () => {
      const r = await psql('secadm', ['-v', 'ON_ERROR_STOP=1', '-f', script('grants', STORY_GRANTS.join('\n') + '\n')]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(lines(r.stdout), ['GRANT', 'GRANT', 'GRANT']);
      assert.doesNotMatch(r.stderr, /ERROR/);
      const rules = await psql('secadm', ['-c', "SELECT proxy_user, kind, without_role, roles FROM trustgate.connect_rules WHERE status = 'granted' ORDER BY proxy_user"]);
      assert.equal(rules.code, 0, rules.stderr);
      assert.deepEqual(lines(rules.stdout), ['alice|permanent|t|{}', 'bob_from_web|application|f|{web_reader,web_writer}', 'carol|permanent|f|{web_reader}']);
    });

    test('app_tier runs the story as a psql script (-v ON_ERROR_STOP=1 -f)', async () => {
      const file = script(
        'story',
        [
          // One request for alice: the band ends with the transaction.
          'BEGIN;',
          "SET QUERY_BAND = 'ProxyUser=alice;order=42;' FOR TRANSACTION;",
          "SELECT current_user, trustgate.proxy_user(), trustgate.query_band_value('order');",
          'SELECT id FROM shop.orders ORDER BY id;',
          'COMMIT;',
          "SELECT 'after commit', current_user, trustgate.proxy_user() IS NULL;",
          // bob_from_web FOR SESSION, each ProxyRole form.
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;' FOR SESSION;",
          "SELECT 'omitted', current_user, trustgate.proxy_role() IS NULL, (SELECT string_agg(id::text, ',') FROM shop.orders);",
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=ALL;' FOR SESSION;",
          "SELECT 'ALL', current_user, trustgate.proxy_role(), (SELECT string_agg(id::text, ',') FROM shop.orders);",
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_reader;' FOR SESSION;",
          "SELECT 'web_reader', current_user, trustgate.proxy_role(), (SELECT string_agg(id::text, ',') FROM shop.orders);",
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=web_writer;' FOR SESSION;",
          "SELECT 'web_writer', current_user, trustgate.proxy_role(), has_table_privilege('shop.orders', 'SELECT'), has_table_privilege('shop.orders', 'INSERT');",
          // The two forms the rule refuses; the session stays as it was.
          '\\set ON_ERROR_STOP 0',
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=NONE;' FOR SESSION;",
          "SET QUERY_BAND = 'ProxyUser=bob_from_web;ProxyRole=auditor;' FOR SESSION;",
          '\\set ON_ERROR_STOP 1',
          "SELECT 'after refusals', current_user, trustgate.proxy_user(), trustgate.proxy_role();",
          'SET QUERY_BAND = NONE FOR SESSION;',
          "SELECT 'none', current_user, trustgate.proxy_user() IS NULL, trustgate.query_band() IS NULL;",
          '',
        ].join('\n'),
      );
      const r = await psql('app_tier', ['-v', 'ON_ERROR_STOP=1', '-f', file]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(lines(r.stdout), [
        'BEGIN',
        'SET',
        'alice|alice|42',
        '1',
        '5',
        'COMMIT',
        'after commit|app_tier|t',
        'SET',
        `omitted|${BOB_UNION}|t|3`,
        'SET',
        `ALL|${BOB_UNION}|ALL|3`,
        'SET',
        'web_reader|web_reader|web_reader|3',
        'SET',
        'web_writer|web_writer|web_writer|f|t',
        'after refusals|web_writer|bob_from_web|web_writer',
        'SET',
        'none|app_tier|t|t',
      ]);
      const errors = errorLines(r.stderr);
      assert.equal(errors.length, 2, r.stderr);
      assert.match(errors[0], /^ERROR: {2}ProxyRole NONE is not allowed for proxy user "bob_from_web"/);
      assert.match(errors[1], /^ERROR: {2}role "auditor" is not in the CONNECT THROUGH rule for proxy user "bob_from_web" through trusted user "app_tier"/);
      assert.match(r.stderr, /HINT: {2}The rule allows: "web_reader", "web_writer"\./);
    });

    test('psql prints the SQLSTATE of a refusal (\\set VERBOSITY verbose) and ON_ERROR_STOP stops there', async () => {
      const file = script(
        'refused',
        ['\\set VERBOSITY verbose', "SELECT 'before';", "SET QUERY_BAND = 'ProxyUser=dave;' FOR SESSION;", "SELECT 'not reached';", ''].join('\n'),
      );
      const r = await psql('app_tier', ['-v', 'ON_ERROR_STOP=1', '-f', file]);
      assert.equal(r.code, 3, `psql exits with 3 when a script stops on error; stderr: ${r.stderr}`);
      assert.equal(r.stdout.trim(), 'before');
      assert.deepEqual(errorLines(r.stderr), ['ERROR:  42501: trusted user "app_tier" has no CONNECT THROUGH rule for proxy user "dave"']);
      assert.match(r.stderr, /HINT: {2}An administrator can grant one: GRANT CONNECT THROUGH "app_tier" TO \[PERMANENT\] "dave"/);
    });

    test('refusals of each kind, each with its SQLSTATE, none changing the session', async () => {
      const file = script(
        'errors',
        [
          '\\set VERBOSITY verbose',
          "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION;",
          "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION;", // 25P01: not in a transaction block
          "SET QUERY_BAND = 'ProxyUser=alice' FOR SESSION;", // 22023: pair not terminated
          "SET QUERY_BAND = 'ProxyRole=web_reader;' FOR SESSION;", // 22023: ProxyRole without ProxyUser
          "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSIONS;", // 42601
          "SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION VOLATILE;", // 0A000
          "SET QUERY_BAND = 'ProxyUser=carol;ProxyRole=NONE;' FOR SESSION;", // 22023: NONE under WITH ROLE
          'SET ROLE carol;', // 42501: identity change from SQL text
          'BEGIN;',
          "SET QUERY_BAND = 'ProxyUser=carol;' FOR SESSION;", // 25001: FOR SESSION changes the proxy inside a transaction
          'SELECT 1;', // 25P02
          'ROLLBACK;',
          "SELECT 'still', current_user, trustgate.proxy_user();",
          'SET QUERY_BAND = NONE FOR SESSION;',
          '',
        ].join('\n'),
      );
      const r = await psql('app_tier', ['-f', file]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(lines(r.stdout), ['SET', 'BEGIN', 'ROLLBACK', 'still|alice|alice', 'SET']);
      assert.deepEqual(errorLines(r.stderr), [
        'ERROR:  25P01: SET QUERY_BAND … FOR TRANSACTION can only be used in transaction blocks',
        'ERROR:  22023: query band pair "ProxyUser=alice" is not terminated by \';\' (at character 19 of the statement)',
        'ERROR:  22023: ProxyRole can only be set while a ProxyUser is in force',
        'ERROR:  42601: syntax error at or near "SESSIONS" in SET QUERY_BAND: expected SESSION or TRANSACTION',
        'ERROR:  0A000: VOLATILE can only be used with FOR SESSION, not FOR TRANSACTION',
        'ERROR:  22023: ProxyRole NONE is not allowed for proxy user "carol": its CONNECT THROUGH rule through "app_tier" is WITH ROLE "web_reader"',
        'ERROR:  42501: SET ROLE is not allowed while a proxy user is in force',
        'ERROR:  25001: SET QUERY_BAND … FOR SESSION cannot change the proxy inside a transaction block',
        'ERROR:  25P02: current transaction is aborted, commands ignored until end of transaction block',
      ]);
    });

    test('in one multi-statement text (psql -c), only a leading FOR TRANSACTION band is accepted', async () => {
      // A FOR TRANSACTION band may lead a request: the rest runs as the proxy, in the request's transaction.
      const led = await psql('app_tier', ['-c', "SET QUERY_BAND = 'ProxyUser=alice;req=7;' FOR TRANSACTION; SELECT current_user, trustgate.query_band_value('req'), count(*) FROM shop.orders", '-c', 'SELECT current_user']);
      assert.equal(led.code, 0, led.stderr);
      assert.deepEqual(lines(led.stdout), ['SET', 'alice|7|2', 'app_tier']);
      const verbose = (sql: string) => psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', sql]);
      // A FOR SESSION band must be a statement of its own.
      const session = await verbose("SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION; SELECT current_user");
      assert.equal(session.code, 1);
      assert.equal(session.stdout, '');
      assert.deepEqual(errorLines(session.stderr), ['ERROR:  0A000: SET QUERY_BAND … FOR SESSION must be a statement of its own']);
      // Only once, and only in front: behind another statement PostgreSQL itself rejects the syntax.
      const twice = await verbose("SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION; SET QUERY_BAND = 'ProxyUser=carol;' FOR TRANSACTION; SELECT 1");
      assert.equal(twice.code, 1);
      assert.deepEqual(errorLines(twice.stderr), ['ERROR:  0A000: SET QUERY_BAND can lead a request only once']);
      const behind = await verbose("SELECT 1; SET QUERY_BAND = 'ProxyUser=alice;' FOR TRANSACTION");
      assert.equal(behind.code, 1);
      assert.deepEqual(errorLines(behind.stderr), ['ERROR:  42601: syntax error at or near "FOR"']);
      // A refused band runs nothing of the request.
      const refusedBand = await verbose("SET QUERY_BAND = 'ProxyUser=dave;' FOR TRANSACTION; SELECT 'ran'");
      assert.equal(refusedBand.code, 1);
      assert.doesNotMatch(refusedBand.stdout, /ran/);
      assert.deepEqual(errorLines(refusedBand.stderr), ['ERROR:  42501: trusted user "app_tier" has no CONNECT THROUGH rule for proxy user "dave"']);
    });

    test('TRUST ONLY: granted with psql -c, proxy changes only as trusted requests, revoked with psql -c', async () => {
      const grant = await psql('secadm', ['-c', 'GRANT CONNECT THROUGH app_tier WITH TRUST ONLY']);
      assert.equal(grant.code, 0, grant.stderr);
      assert.equal(grant.stdout.trim(), 'GRANT');
      const key = await psql('secadm', ['-c', "SELECT trustgate.trust_key('app_tier')"]);
      assert.equal(key.code, 0, key.stderr);
      trustKey = key.stdout.trim();
      assert.match(trustKey, /^[0-9a-f]{64}$/);

      // Unmarked: refused.
      const unmarkedBand = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION"]);
      assert.equal(unmarkedBand.code, 1);
      assert.deepEqual(errorLines(unmarkedBand.stderr), ['ERROR:  42501: trusted user "app_tier" accepts proxy changes only in trusted requests (WITH TRUST ONLY)']);
      // Marked anywhere but at the start of the text: refused too (never a trusted request).
      const misplaced = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', `SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION /*trustgate:trusted=${trustKey}*/`, '-c', 'SELECT current_user']);
      assert.match(
        errorLines(misplaced.stderr).join('\n'),
        /^ERROR: {2}42501: (a trusted-request marking must start the request, before SET QUERY_BAND|trusted user "app_tier" accepts proxy changes only in trusted requests \(WITH TRUST ONLY\))$/,
      );
      assert.equal(misplaced.stdout.trim(), 'app_tier');
      const wrong = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', `/*trustgate:trusted=${'0'.repeat(64)}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`]);
      assert.equal(wrong.code, 1);
      assert.match(wrong.stderr, /ERROR: {2}42501: invalid trusted-request marking/);
      const other = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', `/*trustgate:trusted=${trustKey}*/ SELECT 1`]);
      assert.equal(other.code, 1);
      assert.match(other.stderr, /ERROR: {2}0A000: a trusted-request marking is only accepted on SET QUERY_BAND/);

      const file = script(
        'trusted',
        [
          `/*trustgate:trusted=${trustKey}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION;`,
          'SELECT current_user, trustgate.proxy_user();',
          'SELECT id FROM shop.orders ORDER BY id;',
          // Pairs that leave the proxy as it is need no marking.
          "SET QUERY_BAND = 'order=7;' UPDATE FOR SESSION;",
          'SELECT trustgate.query_band();',
          'BEGIN;',
          `/*trustgate:trusted=${trustKey}*/ SET QUERY_BAND = 'ProxyUser=carol;' FOR TRANSACTION;`,
          'SELECT current_user, trustgate.proxy_user(), trustgate.query_band();',
          'COMMIT;',
          'SELECT current_user;',
          `/*trustgate:trusted=${trustKey}*/ SET QUERY_BAND = NONE FOR SESSION;`,
          'SELECT current_user, trustgate.proxy_user() IS NULL;',
          '',
        ].join('\n'),
      );
      const r = await psql('app_tier', ['-v', 'ON_ERROR_STOP=1', '-f', file]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(lines(r.stdout), [
        'SET',
        'alice|alice',
        '1',
        '5',
        'SET',
        'ProxyUser=alice;order=7;',
        'BEGIN',
        'SET',
        'web_reader|carol|ProxyUser=carol;order=7;',
        'COMMIT',
        'alice',
        'SET',
        'app_tier|t',
      ]);
      assert.equal(r.stderr, '');
      // The key never reaches PostgreSQL (which logs every statement here) nor trustgate's log.
      assert.ok(serverLog.some((l) => l.includes('SELECT current_user, trustgate.proxy_user(), trustgate.query_band()')), 'the server logs statements');
      assert.ok(!serverLog.some((l) => l.includes(trustKey) || l.includes('trustgate:trusted=')), 'the marking is not in the server log');
      assert.ok(!JSON.stringify(stack.logs).includes(trustKey), 'the key is not in the gateway log');

      const revoke = await psql('secadm', ['-c', 'REVOKE CONNECT THROUGH app_tier WITH TRUST ONLY']);
      assert.equal(revoke.code, 0, revoke.stderr);
      assert.equal(revoke.stdout.trim(), 'REVOKE');
      const unmarked = await psql('app_tier', ['-c', "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION", '-c', 'SELECT current_user']);
      assert.equal(unmarked.code, 0, unmarked.stderr);
      assert.deepEqual(lines(unmarked.stdout), ['SET', 'alice']);
    });

    test('rotate_identity_key(): the old trust key stops working; an open psql session keeps its proxy', async () => {
      const grant = await psql('secadm', ['-c', 'GRANT CONNECT THROUGH app_tier WITH TRUST ONLY', '-c', "SELECT trustgate.trust_key('app_tier')"]);
      assert.equal(grant.code, 0, grant.stderr);
      const [tag, oldKey] = lines(grant.stdout);
      assert.equal(tag, 'GRANT');
      assert.match(oldKey, /^[0-9a-f]{64}$/);
      // The administrator rotates the key while app_tier's psql session has alice in force.
      const rotate =
        `PGPASSWORD=${TRUST_USERS.secadm} psql -X -q -h 127.0.0.1 -p ${stack.port} -U secadm -d postgres ` +
        `-c 'SELECT trustgate.rotate_identity_key()' > /dev/null`;
      const file = script(
        'rotation',
        [
          `/*trustgate:trusted=${oldKey}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION;`,
          "SELECT 'before', current_user, trustgate.proxy_user();",
          `\\! ${rotate}`,
          '\\! sleep 0.5', // the NOTIFY reaches this instance's rules store
          "SELECT 'after', current_user, trustgate.proxy_user();",
          "SELECT 'rls', string_agg(id::text, ',' ORDER BY id) FROM shop.orders;",
          '',
        ].join('\n'),
      );
      try {
        const r = await psql('app_tier', ['-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose', '-f', file]);
        assert.equal(r.code, 0, `the open session must keep working after the rotation; stderr: ${r.stderr}`);
        assert.deepEqual(lines(r.stdout), ['SET', 'before|alice|alice', 'after|alice|alice', 'rls|1,5']);
      } finally {
        const newKey = (await psql('secadm', ['-c', "SELECT trustgate.trust_key('app_tier')"])).stdout.trim();
        assert.match(newKey, /^[0-9a-f]{64}$/);
        assert.notEqual(newKey, oldKey);
        const old = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', `/*trustgate:trusted=${oldKey}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`]);
        assert.equal(old.code, 1);
        assert.deepEqual(errorLines(old.stderr), ['ERROR:  42501: invalid trusted-request marking']);
        const fresh = await psql('app_tier', ['-c', `/*trustgate:trusted=${newKey}*/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION`, '-c', 'SELECT current_user, trustgate.proxy_user()']);
        assert.equal(fresh.code, 0, fresh.stderr);
        assert.deepEqual(lines(fresh.stdout), ['SET', 'alice|alice']);
        const revoke = await psql('secadm', ['-c', 'REVOKE CONNECT THROUGH app_tier WITH TRUST ONLY']);
        assert.equal(revoke.stdout.trim(), 'REVOKE', revoke.stderr);
      }
    });

    test('secadm revokes the story rules with psql -f; psql shows REVOKE; app_tier is refused', async () => {
      const file = script(
        'revokes',
        [
          'REVOKE CONNECT THROUGH app_tier FROM bob_from_web WITH ROLE web_writer;',
          'REVOKE CONNECT THROUGH app_tier TO bob_from_web;',
          'REVOKE CONNECT THROUGH app_tier FROM PERMANENT alice;',
          'REVOKE CONNECT THROUGH app_tier FROM PERMANENT carol WITH ROLE web_reader;',
          "SELECT proxy_user, roles, status, revoke_reason FROM trustgate.connect_rules WHERE kind <> 'trust_only' ORDER BY rule_id;",
          '',
        ].join('\n'),
      );
      const r = await psql('secadm', ['-v', 'ON_ERROR_STOP=1', '-f', file]);
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(lines(r.stdout), [
        'REVOKE',
        'REVOKE',
        'REVOKE',
        'REVOKE',
        'alice|{}|revoked|revoked',
        'bob_from_web|{web_reader,web_writer}|revoked|superseded',
        'carol|{web_reader}|revoked|revoked',
        'bob_from_web|{web_reader}|revoked|revoked',
      ]);
      const refusedNow = await psql('app_tier', ['-v', 'VERBOSITY=verbose', '-c', "SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION"]);
      assert.equal(refusedNow.code, 1);
      assert.match(refusedNow.stderr, /ERROR: {2}42501: trusted user "app_tier" has no CONNECT THROUGH rule for proxy user "alice"/);
      // The memberships went with the rules: app_tier's own connection can become none of them.
      const members = await stack.pg.query("SELECT count(*)::int AS n FROM pg_auth_members WHERE member = 'app_tier'::regrole");
      assert.equal(members[0].n, 0);
    });
  });
}
