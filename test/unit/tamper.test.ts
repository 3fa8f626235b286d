import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  clearTamperCache,
  findIdentityTamper,
  tamperStats,
  type TamperContext,
} from '../../src/trust/tamper.js';
import { loadSqlParser } from '../../src/sql/classify.js';

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
const EXEC_SWITCH = `EXECUTE of trustgate's statement "tg_switch"`;
const FN_EXECUTE = 'dynamic SQL (EXECUTE) in function body';
const SUPPORT = 'set_config used as a support function';

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
  // ------------------------------------------------ the gateway's own prepared statements (tg_…): refused for everyone
  always("EXECUTE tg_switch('alice', '', '', 'false')", EXEC_SWITCH),
  always("execute TG_SWITCH('alice', current_setting('trustgate.identity'), current_setting('trustgate.identity_mac'), 'false')", EXEC_SWITCH),
  always('EXECUTE "tg_switch"', EXEC_SWITCH),
  always('EXECUTE "TG_X"', `EXECUTE of trustgate's statement "TG_X"`), // another name, refused to be safe
  always('EXECUTE U&"tg\\005fswitch"', EXEC_SWITCH),
  always('EXECUTE/**/tg_switch_m', `EXECUTE of trustgate's statement "tg_switch_m"`),
  always('EXECUTE tg_0123456789abcdef0123456789ab(1)', `EXECUTE of trustgate's statement "tg_0123456789abcdef0123456789ab"`),
  always('EXPLAIN EXECUTE tg_switch', EXEC_SWITCH),
  always('EXPLAIN (ANALYZE) EXECUTE tg_switch', EXEC_SWITCH),
  always('CREATE TABLE t AS EXECUTE tg_switch', EXEC_SWITCH),
  always('select 1; execute tg_switch', EXEC_SWITCH),
  always('PREPARE tg_switch(text, text, text, text) AS SELECT $1, $2, $3, $4', `PREPARE of trustgate's statement "tg_switch"`),
  always('prepare "Tg_x" as select 1', `PREPARE of trustgate's statement "Tg_x"`),
  always('DEALLOCATE tg_switch', `DEALLOCATE of trustgate's statement "tg_switch"`),
  always('DEALLOCATE PREPARE tg_x', `DEALLOCATE of trustgate's statement "tg_x"`),
  always('deallocate U&"\\0074g_x"', `DEALLOCATE of trustgate's statement "tg_x"`),
  always('DO $$ BEGIN PREPARE tg_x AS SELECT 1; END $$', `PREPARE of trustgate's statement "tg_x" in DO block`),
  always('DO $$ BEGIN DEALLOCATE tg_switch; END $$', `DEALLOCATE of trustgate's statement "tg_switch" in DO block`),
  always("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'EXECUTE tg_switch(1)'", `${EXEC_SWITCH} in function body`),
  always("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS E'DEALLOCATE tg\\137switch'", `DEALLOCATE of trustgate's statement "tg_switch" in function body`),
  always(
    'CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN DEALLOCATE tg_switch; END $$',
    `DEALLOCATE of trustgate's statement "tg_switch" in function body`,
  ),
  allowed('EXECUTE my_stmt(1)'),
  allowed('EXECUTE ntg_x'),
  allowed('EXPLAIN EXECUTE p(1)'),
  allowed('PREPARE p AS SELECT 1'),
  allowed('PREPARE p(int) AS SELECT * FROM orders WHERE id = $1'),
  allowed('DEALLOCATE p'),
  allowed('DEALLOCATE PREPARE p'),
  allowed('DEALLOCATE ALL'),
  allowed('DEALLOCATE PREPARE ALL'),
  allowed("SELECT 'EXECUTE tg_switch' AS tg_note"),
  allowed('SELECT tg_col FROM tg_table'),
  // ------------------------------------------------ functions and procedures created by a trusted user
  trusted("CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SET ROLE alice'; END$$", FN_EXECUTE),
  trusted(
    "CREATE FUNCTION pg_temp.esc_hex() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE convert_from(decode('53455420524f4c4520616c696365', 'hex'), 'UTF8'); END$$",
    FN_EXECUTE,
  ),
  trusted("CREATE OR REPLACE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'select 1'; END $$", FN_EXECUTE),
  trusted("CREATE PROCEDURE pg_temp.esc_proc() LANGUAGE plpgsql AS $$BEGIN EXECUTE 'RESET ROLE'; END$$", FN_EXECUTE),
  trusted("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS E'BEGIN \\105XECUTE ''select 1''; END'", FN_EXECUTE),
  trusted("CREATE FUNCTION f() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXECUTE 'select 1'; END $$", FN_EXECUTE),
  trusted(
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'select 1' LOOP END LOOP; END $$",
    FN_EXECUTE,
  ),
  trusted(
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'select 1'; END $$",
    FN_EXECUTE,
  ),
  // the rest of the body is still checked (a static RESET ROLE comes before the EXECUTE in precedence)
  trusted("CREATE PROCEDURE p() LANGUAGE plpgsql AS $$BEGIN RESET ROLE; EXECUTE 'select 1'; END$$", 'RESET ROLE in function body'),
  trusted('CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $$BEGIN RESET ROLE; END$$', 'RESET ROLE in function body'),
  trusted("CREATE PROCEDURE p() LANGUAGE sql AS 'RESET ROLE'", 'RESET ROLE in function body'),
  trusted(
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ DECLARE r mytab%ROWTYPE; BEGIN r.c := 1; EXECUTE 'select 1'; END $$",
    'function body that cannot be verified',
  ),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE plperl AS 'return 1'", 'function in language "plperl"'),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'", 'function in language "plpython3u"'),
  trusted("CREATE OR REPLACE FUNCTION f() RETURNS int AS 'return 1' LANGUAGE 'pltcl'", 'function in language "pltcl"'),
  trusted("CREATE PROCEDURE p() LANGUAGE plperl AS $$ spi_exec_query('SET ROLE alice') $$", 'procedure in language "plperl"'),
  trusted("CREATE FUNCTION f(text, text, bool) RETURNS text LANGUAGE internal AS 'set_config_by_name'", 'function in language "internal"'),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'mod', 'fn'", 'function in language "c"'),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE 'PLPGSQL' AS 'BEGIN RETURN 1; END'", 'function in language "PLPGSQL"'),
  allowed("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
  allowed("CREATE OR REPLACE FUNCTION f(a int) RETURNS int LANGUAGE SQL IMMUTABLE AS $$ SELECT a + 1 $$"),
  allowed('CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END'),
  allowed("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN INSERT INTO t VALUES (1); RETURN 1; END $$"),
  allowed("CREATE PROCEDURE p() LANGUAGE PLPGSQL AS $$ BEGIN UPDATE t SET role = 'x'; COMMIT; END $$"),
  allowed(
    "CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF TG_OP = 'INSERT' THEN NEW.updated_at := now(); END IF; RETURN NEW; END $$",
  ),
  allowed("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ DECLARE r mytab%ROWTYPE; BEGIN r.c := 1; END $$"),
  // ------------------------------------------------ set_config / dynamic-SQL built-ins as support functions: trusted users
  trusted("CREATE AGGREGATE pg_temp.esc_agg(text, boolean) (SFUNC = pg_catalog.set_config, STYPE = text, INITCOND = 'role')", SUPPORT),
  trusted("CREATE AGGREGATE a(text, bool) (SFUNC = set_config, STYPE = text)", SUPPORT),
  trusted(`CREATE AGGREGATE a(text, bool) (SFUNC = "set_config", STYPE = text)`, SUPPORT),
  trusted(`CREATE AGGREGATE a(text, bool) (SFUNC = U&"\\0073et_config", STYPE = text)`, SUPPORT),
  trusted("CREATE AGGREGATE a(text, bool) (SFUNC = E'set\\137config', STYPE = text)", SUPPORT),
  trusted("create aggregate a(text) (sfunc = f, stype = text, finalfunc = pg_catalog.SET_CONFIG)", SUPPORT),
  trusted("CREATE AGGREGATE a(text) (SFUNC = f, STYPE = text, COMBINEFUNC = set_config)", SUPPORT),
  trusted("CREATE AGGREGATE a (BASETYPE = text, SFUNC = set_config, STYPE = text)", SUPPORT),
  trusted("CREATE OPERATOR ### (FUNCTION = set_config, LEFTARG = text, RIGHTARG = text)", SUPPORT),
  trusted("CREATE OPERATOR ### (PROCEDURE = pg_catalog.set_config, LEFTARG = text, RIGHTARG = text)", SUPPORT),
  trusted("CREATE OPERATOR ### (FUNCTION = E'set\\137config', LEFTARG = text, RIGHTARG = text)", SUPPORT),
  trusted('ALTER OPERATOR + (int, int) SET (RESTRICT = set_config)', SUPPORT),
  trusted('CREATE CAST (text AS int) WITH FUNCTION pg_catalog.set_config(text, text, bool)', SUPPORT),
  trusted('CREATE TRIGGER t BEFORE INSERT ON x FOR EACH ROW EXECUTE FUNCTION set_config()', SUPPORT),
  trusted('CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION set_config()', SUPPORT),
  trusted('CREATE TYPE t (INPUT = set_config, OUTPUT = x)', SUPPORT),
  trusted("CREATE TYPE t (INPUT = f, OUTPUT = E'set\\137config')", SUPPORT),
  trusted('CREATE TYPE r AS RANGE (SUBTYPE = int, SUBTYPE_DIFF = set_config)', SUPPORT),
  trusted('ALTER TYPE t SET (SEND = set_config)', SUPPORT),
  trusted('CREATE OPERATOR CLASS c FOR TYPE int USING btree AS FUNCTION 1 set_config(text, text, bool)', SUPPORT),
  trusted('ALTER OPERATOR FAMILY f USING btree ADD FUNCTION 1 (int, int) set_config(text, text, bool)', SUPPORT),
  trusted("CREATE CONVERSION c FOR 'UTF8' TO 'LATIN1' FROM set_config", SUPPORT),
  trusted('CREATE TRANSFORM FOR int LANGUAGE plpgsql (FROM SQL WITH FUNCTION set_config(internal))', SUPPORT),
  trusted('CREATE LANGUAGE l HANDLER set_config', SUPPORT),
  trusted('CREATE FOREIGN DATA WRAPPER w HANDLER set_config', SUPPORT),
  trusted('CREATE ACCESS METHOD m TYPE TABLE HANDLER set_config', SUPPORT),
  trusted("CREATE FUNCTION f() RETURNS int LANGUAGE sql SUPPORT set_config AS 'select 1'", SUPPORT),
  trusted('ALTER FUNCTION f() SUPPORT pg_catalog.set_config', SUPPORT),
  trusted('CREATE TEXT SEARCH PARSER p (START = set_config, GETTOKEN = x, END = x, LEXTYPES = x)', SUPPORT),
  trusted("CREATE AGGREGATE a(text) (SFUNC = query_to_xml, STYPE = xml)", 'query_to_xml used as a support function'),
  trusted("CREATE AGGREGATE a(text) (SFUNC = E'ts\\137stat', STYPE = text)", 'ts_stat used as a support function'),
  allowed('CREATE AGGREGATE a(int) (SFUNC = int4pl, STYPE = int, INITCOND = 0)'),
  allowed("CREATE AGGREGATE a(text) (SFUNC = textcat, STYPE = text, INITCOND = 'set_config_x')"),
  allowed('CREATE OPERATOR ### (FUNCTION = int4pl, LEFTARG = int, RIGHTARG = int)'),
  allowed('CREATE CAST (text AS int) WITH FUNCTION my_cast(text)'),
  allowed("CREATE TRIGGER t BEFORE INSERT ON x FOR EACH ROW EXECUTE FUNCTION audit('set_config')"),
  allowed('CREATE TYPE t (INPUT = t_in, OUTPUT = t_out)'),
  allowed("CREATE TYPE mood AS ENUM ('role', 'set_config')"),
  allowed("CREATE COLLATION c (provider = icu, locale = 'und')"),
  allowed('SELECT type FROM t WHERE search = $1'),
  allowed('SET search_path = app'),
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
  allowed("select ts_rewrite('a'::tsquery, 'a'::tsquery, 'b'::tsquery)"),
  allowed('set role'), // does not parse: PostgreSQL rejects it as well
  allowed("SELECT set_config('role', 'x', false"), // likewise
];

describe('findIdentityTamper', () => {
  before(async () => {
    await loadSqlParser();
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
    const plain = [
      'SELECT * FROM orders WHERE id = $1',
      'INSERT INTO t (a, b) VALUES ($1, $2)',
      'BEGIN',
      'COMMIT',
      'SELECT typename, research FROM t',
      'DEALLOCATE ALL',
      'EXECUTE my_stmt(1)',
    ];
    for (const sql of plain) {
      assert.equal(findIdentityTamper(sql, PROXY), null);
    }
    assert.equal(tamperStats.skipped - before.skipped, plain.length);
    assert.equal(tamperStats.parsed - before.parsed, 0);
    assert.equal(tamperStats.cacheHits - before.cacheHits, 0);
  });

  it('never skips the parser for texts the new rules refuse (keywords, quoted and U& names, E\'\' strings, comments)', () => {
    // Each of these is refused when parsed; the pre-check must not let any of them through.
    const texts = [
      'EXECUTE tg_switch',
      'EXECUTE "TG_SWITCH"',
      'EXECUTE U&"\\0074\\0067\\005fswitch"',
      'EXECUTE U&"!0074!0067!005fswitch" UESCAPE \'!\'',
      'PREPARE/**/tg_x AS SELECT 1',
      'DEALLOCATE -- c\n tg_x',
      "CREATE AGGREGATE a(text, bool) (SFUNC = E'set\\137config', STYPE = text)",
      "CREATE/**/AGGREGATE a(text, bool) (SFUNC = E'\\163et_config', STYPE = text)",
      "CREATE OPERATOR ### (FUNCTION = E'set\\137config', LEFTARG = text, RIGHTARG = text)",
      "ALTER OPERATOR + (int, int) SET (RESTRICT = E'set\\137config')",
      "CREATE TYPE t (INPUT = f, OUTPUT = E'set\\137config')",
      "CREATE/**/TYPE r AS RANGE (SUBTYPE = int, SUBTYPE_DIFF = E'set\\137config')",
      "ALTER TYPE t SET (SEND = E'set\\137config')",
      "CREATE TEXT SEARCH PARSER p (START = E'set\\137config', GETTOKEN = x, END = x, LEXTYPES = x)",
      "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE convert_from(decode('53', 'hex'), 'UTF8'); END$$",
      "CREATE PROCEDURE p() LANGUAGE plperl AS $$ 1 $$",
    ];
    for (const sql of texts) {
      clearTamperCache();
      const before = { ...tamperStats };
      assert.notEqual(findIdentityTamper(sql, TRUSTED), null, sql);
      assert.equal(tamperStats.skipped - before.skipped, 0, sql);
      assert.equal(tamperStats.parsed - before.parsed, 1, sql);
    }
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
