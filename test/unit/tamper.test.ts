import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  clearTamperCache,
  findIdentityTamper,
  loadTamperParser,
  tamperStats,
  type TamperContext,
} from '../../src/trust/tamper.js';

/** The three contexts: an ordinary user, a trusted user with no proxy, a trusted user with a proxy in force. */
const USER: TamperContext = { trustedUser: false, proxyActive: false };
const TRUSTED: TamperContext = { trustedUser: true, proxyActive: false };
const PROXY: TamperContext = { trustedUser: true, proxyActive: true };

type Expect = string | RegExp | null;
interface Case {
  sql: string;
  user: Expect;
  trusted: Expect;
  proxy: Expect;
}

/** Refused for everyone. */
const always = (sql: string, reason: Expect): Case => ({ sql, user: reason, trusted: reason, proxy: reason });
/** Refused for trusted users (with or without a proxy in force). */
const trusted = (sql: string, reason: Expect): Case => ({ sql, user: null, trusted: reason, proxy: reason });
/** Refused only while a proxy is in force. */
const proxy = (sql: string, reason: Expect): Case => ({ sql, user: null, trusted: null, proxy: reason });
/** Allowed everywhere. */
const allowed = (sql: string): Case => ({ sql, user: null, trusted: null, proxy: null });

const TG = 'writing setting "trustgate.identity"';

const CASES: Case[] = [
  // ------------------------------------------------ trustgate's own settings: refused for everyone
  always("SET trustgate.identity = 'x'", TG),
  always("set local TrustGate.Identity_Mac to 'x'", 'writing setting "trustgate.identity_mac"'),
  always('RESET trustgate.identity', TG),
  always(`SET "trustgate"."identity" = 'x'`, TG),
  always(`SET "trustgate.identity" = 'x'`, TG),
  always(`SET U&"trustgate.\\0069dentity" = 'x'`, TG),
  always("select set_config('trustgate.identity', 'x', false)", TG),
  always("select set_config('TRUSTGATE.IDENTITY', 'x', true)", TG),
  always("select 1; select set_config(E'trustgate\\056identity', 'x', false)", TG),
  always("select pg_catalog.set_config(setting_name => 'trustgate.identity', new_value => 'x', is_local => false)", TG),
  always("ALTER ROLE app SET trustgate.identity = 'x'", TG),
  always("ALTER DATABASE db SET trustgate.identity TO 'x'", TG),
  always('ALTER ROLE ALL IN DATABASE db RESET trustgate.identity', TG),
  always("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET trustgate.identity = 'x' AS 'select 1'", TG),
  always('ALTER FUNCTION f() SET trustgate.x = 1', 'writing setting "trustgate.x"'),
  always("ALTER SYSTEM SET trustgate.identity = 'x'", TG),
  always("DO $$ BEGIN SET trustgate.identity = 'x'; END $$", `${TG} in DO block`),
  // ------------------------------------------------ writes to pg_settings: refused for everyone
  always("UPDATE pg_settings SET setting = 'x' WHERE name = 'trustgate.identity'", 'UPDATE pg_settings'),
  always("update pg_catalog.pg_settings set setting = 'x' where name = 'search_path'", 'UPDATE pg_settings'),
  always(`WITH u AS (UPDATE "pg_settings" SET setting = 'x' WHERE name = 'role' RETURNING 1) SELECT * FROM u`, 'UPDATE pg_settings'),
  always("INSERT INTO pg_settings (name) VALUES ('x')", 'INSERT INTO pg_settings'),
  always('DELETE FROM pg_settings', 'DELETE FROM pg_settings'),
  always("MERGE INTO pg_settings s USING t ON true WHEN MATCHED THEN UPDATE SET setting = 'x'", 'MERGE INTO pg_settings'),
  always('COPY pg_settings FROM STDIN', 'COPY pg_settings FROM'),
  // ------------------------------------------------ SET ROLE / SESSION AUTHORIZATION: trusted users
  trusted('SET ROLE x', 'SET ROLE'),
  trusted('set role none', 'SET ROLE'),
  trusted('SET LOCAL ROLE x', 'SET LOCAL ROLE'),
  trusted('RESET ROLE', 'RESET ROLE'),
  trusted('SET ROLE TO DEFAULT', 'SET ROLE'),
  trusted('SET SESSION ROLE x', 'SET ROLE'),
  trusted('SET SESSION AUTHORIZATION x', 'SET SESSION AUTHORIZATION'),
  trusted('reset session authorization', 'RESET SESSION AUTHORIZATION'),
  trusted('SET SESSION AUTHORIZATION DEFAULT', 'SET SESSION AUTHORIZATION'),
  trusted('set local session authorization x', 'SET LOCAL SESSION AUTHORIZATION'),
  trusted("set session_authorization = 'x'", 'SET SESSION AUTHORIZATION'),
  trusted('SET "Role" = x', 'SET ROLE'),
  trusted('SET U&"\\0072ole" TO x', 'SET ROLE'),
  trusted('SET/**/ROLE x', 'SET ROLE'),
  trusted('set -- a comment\n role x', 'SET ROLE'),
  trusted('/* a /* nested */ b */ SeT\trOlE\n\nx', 'SET ROLE'),
  trusted('select 1; set role x', 'SET ROLE'),
  trusted("select 'a;'; reset role; select 2", 'RESET ROLE'),
  // ------------------------------------------------ set_config: trusted users
  trusted("SELECT set_config('role', 'x', false)", "set_config('role')"),
  trusted("select SET_CONFIG('ROLE', 'x', true)", "set_config('role')"),
  trusted(`select "set_config"('role', 'x', false)`, "set_config('role')"),
  trusted(`select U&"\\0073et_config"('role', 'x', false)`, "set_config('role')"),
  trusted("select pg_catalog.set_config(U&'\\0072ole', 'x', false)", "set_config('role')"),
  trusted("select set_config($$role$$, 'x', false)", "set_config('role')"),
  trusted("select set_config(E'r\\157le', 'x', false)", "set_config('role')"),
  trusted("select (select set_config('role', 'x', false))", "set_config('role')"),
  trusted("with c as (select set_config('session_authorization', 'x', false)) select * from c", "set_config('session_authorization')"),
  trusted("select * from set_config('role', 'x', false)", "set_config('role')"),
  trusted("select set_config(new_value => 'x', setting_name => 'role', is_local => false)", "set_config('role')"),
  trusted("CALL set_config('role', 'x', false)", "set_config('role')"),
  trusted("EXPLAIN ANALYZE SELECT set_config('role', 'x', false)", "set_config('role')"),
  trusted("PREPARE p AS SELECT set_config('role', 'x', false)", "set_config('role')"),
  trusted("COPY (SELECT set_config('role', 'x', false)) TO STDOUT", "set_config('role')"),
  trusted("CREATE TABLE t (c text DEFAULT set_config('role', 'x', false))", "set_config('role')"),
  trusted("CREATE RULE r AS ON INSERT TO t DO ALSO SELECT set_config('role', 'x', false)", "set_config('role')"),
  trusted('SELECT set_config($1, $2, false)', 'set_config with a non-constant setting name'),
  trusted("select set_config('ro' || 'le', 'x', false)", 'set_config with a non-constant setting name'),
  trusted("select set_config(name, 'x', false) from t", 'set_config with a non-constant setting name'),
  trusted("select set_config('role'::text, 'x', false)", 'set_config with a non-constant setting name'),
  trusted('CREATE VIEW v AS SELECT * FROM pg_catalog.pg_settings', 'CREATE VIEW over pg_settings'),
  trusted("CREATE OR REPLACE VIEW v AS SELECT name FROM t WHERE name IN (SELECT name FROM pg_settings)", 'CREATE VIEW over pg_settings'),
  // ------------------------------------------------ defaults of roles, databases, functions: trusted users
  trusted("ALTER ROLE app SET role = 'admin'", 'ALTER ROLE … SET role'),
  trusted('ALTER USER app IN DATABASE db SET ROLE TO admin', 'ALTER ROLE … SET role'),
  trusted('ALTER ROLE app RESET role', 'ALTER ROLE … RESET role'),
  trusted("ALTER DATABASE db SET session_authorization = 'x'", 'ALTER DATABASE … SET session_authorization'),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET role = admin AS 'select 1'", 'function SET role'),
  trusted('CREATE OR REPLACE PROCEDURE p() LANGUAGE sql SET ROLE FROM CURRENT AS $$select 1$$', 'function SET role'),
  trusted('ALTER FUNCTION f() SET role = admin', 'function SET role'),
  // ------------------------------------------------ DO blocks
  trusted("DO $$ BEGIN PERFORM set_config('role', 'x', false); END $$", "set_config('role') in DO block"),
  trusted("DO $$ BEGIN EXECUTE 'set role x'; END $$", 'dynamic SQL (EXECUTE) in DO block'),
  trusted("do $body$ declare q text := 'select 1'; begin execute q; end $body$", 'dynamic SQL (EXECUTE) in DO block'),
  trusted('DO $$ BEGIN BEGIN BEGIN SET ROLE x; END; END; END $$', 'SET ROLE in DO block'),
  trusted(
    "DO $$ BEGIN PERFORM 1; EXCEPTION WHEN others THEN PERFORM set_config('role', 'x', false); END $$",
    "set_config('role') in DO block",
  ),
  trusted("DO $$ BEGIN IF set_config('role', 'x', false) IS NULL THEN NULL; END IF; END $$", "set_config('role') in DO block"),
  trusted("DO $$ DECLARE v text; BEGIN v := set_config('role', 'x', false); END $$", "set_config('role') in DO block"),
  trusted("DO $$ DECLARE a int[]; BEGIN a[length(set_config('role', 'x', false))] := 1; END $$", "set_config('role') in DO block"),
  trusted("DO $$ DECLARE v text := set_config('role', 'x', false); BEGIN END $$", "set_config('role') in DO block"),
  trusted("DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'select 1' LOOP END LOOP; END $$", 'dynamic SQL (EXECUTE) in DO block'),
  trusted("DO $$ DECLARE n text := 'role'; BEGIN PERFORM set_config(n, 'x', false); END $$", 'set_config with a non-constant setting name in DO block'),
  trusted("DO E'BEGIN PERFORM set\\137config(''role'', ''x'', false); END'", "set_config('role') in DO block"),
  trusted("DO LANGUAGE plpgsql 'BEGIN RESET ROLE; END'", 'RESET ROLE in DO block'),
  trusted('DO LANGUAGE sql $$ select 1 $$', 'DO block in language "sql"'),
  trusted("DO $$ print 'x' $$ LANGUAGE plperl", 'DO block in language "plperl"'),
  trusted("DO $$ DECLARE r mytab%ROWTYPE; BEGIN r.c := 1; EXECUTE 'select 1'; END $$", 'DO block that cannot be verified'),
  // ------------------------------------------------ other dynamic SQL and lexer settings: trusted users
  trusted("select query_to_xml('select set_config(''role'', ''x'', false)', true, true, '')", 'dynamic SQL (query_to_xml)'),
  trusted("select * from ts_stat('select to_tsvector(set_config(''role'', ''x'', false))')", 'dynamic SQL (ts_stat)'),
  trusted('SET standard_conforming_strings = off', "SET standard_conforming_strings = 'off'"),
  trusted("SET NAMES 'SJIS'", "SET client_encoding = 'SJIS'"),
  trusted("select set_config('client_encoding', 'BIG5', false)", "set_config('client_encoding')"),
  trusted("ALTER ROLE app SET standard_conforming_strings = false", "ALTER ROLE … SET standard_conforming_strings = 'false'"),
  // ------------------------------------------------ bodies of functions created in the text: trusted users
  trusted("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'SET ROLE x'", 'SET ROLE in function body'),
  trusted(
    "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS E'select set\\137config(''role'', ''x'', false)'",
    "set_config('role') in function body",
  ),
  trusted("CREATE FUNCTION f() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('role', 'x', false); END", "set_config('role')"),
  trusted(
    "CREATE FUNCTION f(a int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN PERFORM set_config('role', 'x', false); RETURN a; END $$",
    "set_config('role') in function body",
  ),
  // ------------------------------------------------ session resets: only while a proxy is in force
  proxy('DISCARD ALL', 'DISCARD ALL'),
  proxy('RESET ALL', 'RESET ALL'),
  proxy('select 1; discard all', 'DISCARD ALL'),
  proxy('DO $$ BEGIN RESET ALL; END $$', 'RESET ALL in DO block'),
  // ------------------------------------------------ allowed everywhere
  allowed('SHOW role'),
  allowed('SHOW session_authorization'),
  allowed("SELECT current_setting('role')"),
  allowed("SELECT current_setting('trustgate.identity', true)"),
  allowed('SET search_path = app, public'),
  allowed("SET LOCAL statement_timeout = '5s'"),
  allowed("SET LOCAL work_mem = '64MB'"),
  allowed('SET TRANSACTION ISOLATION LEVEL SERIALIZABLE'),
  allowed("select set_config('search_path', 'app', false)"),
  allowed("select set_config('application_name', $1, false)"),
  allowed('CREATE ROLE r'),
  allowed('GRANT r TO u'),
  allowed('ALTER ROLE u SET search_path = app'),
  allowed('ALTER ROLE u RESET ALL'),
  allowed('ALTER FUNCTION f() RESET ALL'),
  allowed('DISCARD TEMP'),
  allowed('DISCARD PLANS'),
  allowed('DISCARD SEQUENCES'),
  allowed("SELECT * FROM pg_settings WHERE name = 'role'"),
  allowed('SELECT role FROM users JOIN user_roles USING (id)'),
  allowed('DO $$ BEGIN PERFORM 1; INSERT INTO t VALUES (1); END $$'),
  allowed('DO $$ DECLARE r mytab%ROWTYPE; BEGIN r.c := 1; END $$'),
  allowed("SELECT 'set role x', 'set_config(''role'', ''x'', false)'"),
  allowed('-- set role x\nselect 1'),
  allowed('select $$ set role x $$'),
  allowed('SET standard_conforming_strings = on'),
  allowed("SET client_encoding = 'UTF8'"),
  allowed("SET NAMES 'LATIN1'"),
  allowed('SET client_encoding TO DEFAULT'),
  allowed("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'select 1'; END $$"),
  allowed("select ts_rewrite('a'::tsquery, 'a'::tsquery, 'b'::tsquery)"),
  allowed('set role'), // does not parse: PostgreSQL rejects it as well
  allowed("SELECT set_config('role', 'x', false"), // likewise
];

describe('findIdentityTamper', () => {
  before(async () => {
    await loadTamperParser();
  });

  const contexts: [keyof Omit<Case, 'sql'>, TamperContext][] = [
    ['user', USER],
    ['trusted', TRUSTED],
    ['proxy', PROXY],
  ];
  for (const c of CASES) {
    it(JSON.stringify(c.sql), () => {
      for (const [name, ctx] of contexts) {
        const got = findIdentityTamper(c.sql, ctx);
        const want = c[name];
        if (want === null) assert.equal(got, null, `${name}: expected allowed, got ${got}`);
        else if (want instanceof RegExp) assert.match(got ?? '(allowed)', want, `${name}`);
        else assert.equal(got, want, `${name}`);
      }
    });
  }

  it('has a table of at least 60 cases', () => {
    assert.ok(CASES.length >= 60, String(CASES.length));
  });

  it('skips the parser for text that cannot match', () => {
    const before = { ...tamperStats };
    for (const sql of ['SELECT * FROM orders WHERE id = $1', 'INSERT INTO t (a, b) VALUES ($1, $2)', 'BEGIN', 'COMMIT']) {
      assert.equal(findIdentityTamper(sql, PROXY), null);
    }
    assert.equal(tamperStats.skipped - before.skipped, 4);
    assert.equal(tamperStats.parsed - before.parsed, 0);
    assert.equal(tamperStats.cacheHits - before.cacheHits, 0);
  });

  it('parses each suspect text once and decides per context from the cached facts', () => {
    clearTamperCache();
    const sql = "select 1; select set_config('role', 'x', false); discard all";
    const before = { ...tamperStats };
    assert.equal(findIdentityTamper(sql, USER), null);
    assert.equal(findIdentityTamper(sql, TRUSTED), "set_config('role')");
    assert.equal(findIdentityTamper(sql, PROXY), "set_config('role')");
    assert.equal(tamperStats.parsed - before.parsed, 1);
    assert.equal(tamperStats.cacheHits - before.cacheHits, 2);
  });

  it('reports the most serious finding first', () => {
    const sql = "set role x; set trustgate.identity = 'y'; discard all";
    assert.equal(findIdentityTamper(sql, USER), TG);
    assert.equal(findIdentityTamper(sql, PROXY), TG);
    assert.equal(findIdentityTamper('discard all; set role x', PROXY), 'SET ROLE');
  });

  it('fails closed on text too deep for the parser to verify', () => {
    // PostgreSQL may accept what libpg-query cannot turn into a tree: nothing is assumed about it.
    const deep = (inner: string): string => `select 1${' + 1'.repeat(6000)} + length(${inner})`;
    assert.equal(findIdentityTamper(deep("set_config('role', 'x', false)"), TRUSTED), 'SQL text too complex to verify');
    assert.equal(findIdentityTamper(deep("set_config('role', 'x', false)"), USER), 'SQL text too complex to verify');
    assert.equal(findIdentityTamper(deep("current_setting('role')"), TRUSTED), 'SQL text too complex to verify');
    assert.equal(findIdentityTamper(deep("current_setting('role')"), USER), null);
  });
});
