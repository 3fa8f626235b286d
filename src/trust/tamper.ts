/**
 * Finds SQL that would change the session's identity behind the gateway's back.
 *
 * While a trusted session runs, trustgate switches the pooled server connection to the proxy
 * identity (`set_config('role', …)` plus the custom settings `trustgate.identity` and
 * `trustgate.identity_mac`). Client SQL must not change that identity. This module looks at the
 * client's SQL text with the real PostgreSQL 18 parser (libpg-query) and reports the first thing
 * that would:
 *
 * - always (any user): writing a `trustgate.*` setting (SET / SET LOCAL / RESET, `set_config`,
 *   ALTER ROLE|DATABASE|SYSTEM … SET, a function's SET clause), any write to `pg_settings`, and
 *   SQL-level EXECUTE / PREPARE / DEALLOCATE of a prepared statement named `tg_…` (the gateway's own
 *   statements on server connections, e.g. `tg_switch`, which runs `set_config('role', $1, …)`;
 *   DEALLOCATE ALL stays allowed: the gateway notices its command tag);
 * - for a trusted user (one with CONNECT THROUGH rules), even with no proxy in force: SET ROLE,
 *   RESET ROLE, SET / RESET SESSION AUTHORIZATION, `set_config('role' | 'session_authorization')`,
 *   `set_config` with a setting name that is not a string constant, ALTER ROLE|DATABASE … SET role,
 *   function SET clauses for those, CREATE VIEW over pg_settings, dynamic SQL (EXECUTE in a DO
 *   block or in the body of a function or procedure created in the text, `query_to_xml` and the
 *   other built-ins that run SQL text), DO blocks and functions in languages other than `sql` and
 *   `plpgsql` (their code can run any SQL) or that cannot be parsed, `set_config` or one of those
 *   built-ins named as a support function in DDL (an aggregate's SFUNC, an operator's FUNCTION, a
 *   cast's WITH FUNCTION, a trigger's EXECUTE FUNCTION, a type's INPUT, …), and
 *   settings that change how the server lexes later SQL text (`standard_conforming_strings` off,
 *   `client_encoding` set to a client-only multibyte encoding such as SJIS: with them the server
 *   would read a text differently from the parser here, which could hide a SET ROLE in what looks
 *   like a string literal);
 * - while a proxy is in force, additionally: DISCARD ALL (resets the role) and RESET ALL (clears
 *   the identity settings).
 *
 * Every statement of a multi-statement text is walked in full (CTEs, subqueries, rule actions,
 * EXPLAIN, PREPARE, COPY (query), column defaults, …). DO blocks in PL/pgSQL are parsed with the
 * PL/pgSQL parser and every embedded SQL statement and expression is checked with the same rules.
 * The bodies of functions and procedures created in the same text (LANGUAGE sql and plpgsql, and
 * BEGIN ATOMIC) are checked for the same facts; a PL/pgSQL body is always parsed (EXECUTE needs no
 * suspect word: `EXECUTE convert_from(decode('5345…', 'hex'), 'UTF8')`), and one the parser cannot
 * read is unverifiable when it contains EXECUTE or a suspect word, as for DO blocks.
 *
 * A text the parser rejects yields nothing: PostgreSQL's own parser (the same grammar) rejects it
 * too and runs none of it. Failures that are not syntax errors (the parser not loaded, a tree too
 * deep for the parser's or this walker's stack) fail closed.
 *
 * Outside the gateway's view, on purpose: SQL run by server-side code — dynamic SQL inside
 * functions and procedures, function bodies, rules, triggers, views and event triggers created
 * earlier (or by someone else), extensions that run SQL text. What such code can do is bounded by
 * PostgreSQL itself: SET ROLE only reaches roles the session's login user is a member of (with
 * the SET option), so the pooled connection of trusted user T can only ever become what T's own
 * role memberships allow — those memberships, not this module, are the hard bound, and must match
 * T's rules — and SET SESSION AUTHORIZATION needs a superuser login. `trustgate.identity` carries a
 * MAC (`trustgate.identity_mac`) that SQL cannot forge, so a forged identity setting is detectable.
 * For users without CONNECT THROUGH rules only statically visible writes to trustgate's settings
 * and statically visible uses of the gateway's `tg_` statements are refused (EXECUTE in their DO
 * blocks and function bodies is allowed); the MAC covers the rest.
 *
 * Hot path: a case-insensitive pre-check returns without parsing for text that contains none of
 * the words any of the above needs (a keyword, a function or setting name; `u&` because a Unicode
 * escaped identifier such as U&"\0073et_config" can spell any name). String constants — dollar
 * quoted, E'' with escapes — never become names or keywords in plain SQL; the only ways to run a
 * string as SQL are DO (caught by `do`), the built-ins in DYNAMIC_FUNCTIONS (caught by their names)
 * and server-side functions (created in the text: caught by `function` / `procedure`; else outside
 * the view, above). A prepared statement's name is an identifier (caught by `tg_` or `u&`). One
 * place reads a string constant as a name: a support function in a DDL definition list may be
 * given as a string (`SFUNC = E'set\137config'`), so the statements that take such lists are
 * caught by keywords (`aggregate`, `operator`, `type`, `search`). Findings are cached per SQL text
 * as a small set of categories (the decision depends on the session's context, the facts do not).
 */
import { parsePlPgSQLSync, parseSync, scanSync } from 'libpg-query';
import { foldIdentifier } from './sql-text.js';

export interface TamperContext {
  /** The login user has CONNECT THROUGH rules. */
  trustedUser: boolean;
  /** A proxy user is in force on the session now. */
  proxyActive: boolean;
}

/** Counters for tests and metrics. */
export const tamperStats = {
  /** findIdentityTamper calls. */
  calls: 0,
  /** Calls answered by the pre-check without parsing. */
  skipped: 0,
  /** Calls answered from the per-text cache. */
  cacheHits: 0,
  /** Texts handed to the parser. */
  parsed: 0,
};

// ------------------------------------------------------------------------------------ categories

/** Fact categories, by precedence (the lowest set bit gives the reason reported). */
const Fact = {
  /** Writing a trustgate.* setting. */
  TrustgateSetting: 0,
  /** UPDATE / INSERT / DELETE / MERGE / COPY FROM on pg_settings. */
  PgSettingsWrite: 1,
  /** EXECUTE / PREPARE / DEALLOCATE of a statement named tg_… (the gateway's own statements). */
  GatewayStatement: 2,
  /** The text could not be verified and may write trustgate's settings or use a tg_ statement. */
  UnverifiableAlways: 3,
  /** SET ROLE, SET SESSION AUTHORIZATION, set_config('role'), ALTER ROLE … SET role, … */
  RoleChange: 4,
  /**
   * set_config with a setting name that is not a string constant; a view over pg_settings;
   * set_config as a support function (an aggregate's SFUNC, …).
   */
  OpaqueSetConfig: 5,
  /** EXECUTE in a DO block or function body, query_to_xml and other built-ins that run SQL text. */
  DynamicSql: 6,
  /** A DO block or function in another language, or a piece that cannot be parsed. */
  Unverifiable: 7,
  /** A setting that changes how the server lexes SQL text. */
  LexerSetting: 8,
  /** DISCARD ALL, RESET ALL. */
  SessionReset: 9,
} as const;
type Fact = (typeof Fact)[keyof typeof Fact];

const bit = (f: Fact): number => 1 << f;
const ALWAYS = bit(Fact.TrustgateSetting) | bit(Fact.PgSettingsWrite) | bit(Fact.GatewayStatement) | bit(Fact.UnverifiableAlways);
const TRUSTED =
  bit(Fact.RoleChange) | bit(Fact.OpaqueSetConfig) | bit(Fact.DynamicSql) | bit(Fact.Unverifiable) | bit(Fact.LexerSetting);
const PROXY = bit(Fact.SessionReset);

interface Facts {
  readonly mask: number;
  /** reasons[f]: the first reason found for fact f. */
  readonly reasons: readonly string[];
}

const NO_FACTS: Facts = Object.freeze({ mask: 0, reasons: Object.freeze([]) });

// ------------------------------------------------------------------------------------ pre-check

/**
 * Words one of which any text the rules can refuse contains (case-insensitive). Keywords cannot be
 * quoted or escaped; names can be quoted ("role" still contains the letters) or Unicode-escaped
 * (`u&`). `authorization`: SET SESSION AUTHORIZATION and session_authorization. `function`,
 * `procedure`: bodies of functions created in the text (may hide names in E'' escapes), their
 * language and SUPPORT clause. The lexer settings: standard_conforming_strings, client_encoding,
 * SET NAMES. `tg_`: the names of the gateway's prepared statements (an identifier: plain, quoted,
 * or `u&`). `aggregate`, `operator`, `type`, `search` (TEXT SEARCH): DDL whose definition list may
 * name a support function as a string constant, where an E'' escape can hide `set_config`; every
 * other way to name a function in DDL spells it as an identifier (caught by the name or `u&`).
 * `type` and `search` as whole words: a keyword is never part of a longer identifier (`search_path`
 * is not TEXT SEARCH), and a keyword cannot be quoted, escaped or split by a comment.
 */
const SUSPECT =
  /role|authorization|set_config|trustgate|pg_settings|discard|reset|\bdo\b|u&|function|procedure|standard_conforming|client_encoding|\bnames\b|query_to_xml|ts_stat|ts_rewrite|crosstab|connectby|xpath_table|tg_|aggregate|operator|\btype\b|\bsearch\b/i;

/** In an unverifiable text: words without which it cannot write trustgate's settings or pg_settings. */
const ALWAYS_SUSPECT = /trustgate|pg_settings|set_config|u&/i;
/**
 * In an unverifiable text: EXECUTE / PREPARE / DEALLOCATE of a tg_ statement needs one of the
 * keywords and the name (`tg_`, or `u&`, already in ALWAYS_SUSPECT). Both are required so that a
 * PL/pgSQL trigger function reading TG_OP is not refused for everyone just for that.
 */
const GATEWAY_NAME = /tg_/i;
const GATEWAY_VERB = /execute|prepare|deallocate/i;

/** Prefix of the names of the gateway's own prepared statements on server connections. */
const GATEWAY_STATEMENT_PREFIX = 'tg_';

/** Languages whose function bodies are checked here; code in any other language can run any SQL. */
const CHECKED_LANGUAGES = new Set(['sql', 'plpgsql']);

/**
 * DDL that names support functions, and the fields that hold the names (checked for set_config and
 * the DYNAMIC_FUNCTIONS). A definition list (`(SFUNC = …)`) may give a name as a type name, a
 * qualified name or a string constant; every String in these fields is checked.
 */
const SUPPORT_FUNCTION_FIELDS: Readonly<Record<string, readonly string[]>> = {
  DefineStmt: ['definition'], // CREATE AGGREGATE / OPERATOR / TYPE / TEXT SEARCH PARSER|TEMPLATE …
  CreateRangeStmt: ['params'], // CREATE TYPE … AS RANGE (SUBTYPE_DIFF = …, CANONICAL = …)
  AlterOperatorStmt: ['options'], // ALTER OPERATOR … SET (RESTRICT = …, JOIN = …)
  AlterTypeStmt: ['options'], // ALTER TYPE … SET (SEND = …, …)
  CreateCastStmt: ['func'],
  CreateOpClassStmt: ['items'],
  AlterOpFamilyStmt: ['items'],
  CreateConversionStmt: ['func_name'],
  CreateTransformStmt: ['fromsql', 'tosql'],
  CreatePLangStmt: ['plhandler', 'plinline', 'plvalidator'],
  CreateFdwStmt: ['func_options'],
  AlterFdwStmt: ['func_options'],
  CreateAmStmt: ['handler_name'],
  CreateTrigStmt: ['funcname'], // not args: strings passed to the trigger function
  CreateEventTrigStmt: ['funcname'],
};

/** Built-in and common-extension functions that run SQL text given as an argument. */
const DYNAMIC_FUNCTIONS = new Set([
  'query_to_xml',
  'query_to_xmlschema',
  'query_to_xml_and_xmlschema',
  'ts_stat',
  'ts_rewrite', // the two-argument form runs a SELECT given as text
  'crosstab', // tablefunc
  'crosstab2',
  'crosstab3',
  'crosstab4',
  'connectby', // tablefunc: builds a query from unquoted identifiers
  'xpath_table', // xml2
]);

const IDENTITY_SETTINGS = new Set(['role', 'session_authorization']);

/**
 * Client-only encodings (PostgreSQL's encnames.c aliases, normalised: lower case, alphanumerics
 * only) whose multibyte characters can end in an ASCII byte such as a backslash: the server
 * converts them before lexing, the gateway does not, so the two would read a text differently.
 */
const CLIENT_ONLY_ENCODINGS = new Set([
  'big5', 'win950', 'windows950',
  'gbk', 'win936', 'windows936',
  'gb18030',
  'uhc', 'win949', 'windows949',
  'johab',
  'sjis', 'shiftjis', 'mskanji', 'win932', 'windows932',
  'shiftjis2004',
]);

/** Values PostgreSQL's parse_bool reads as true (prefixes of true/yes, "on", "1"). */
const BOOL_TRUE = new Set(['t', 'tr', 'tru', 'true', 'y', 'ye', 'yes', 'on', '1']);

/** Nesting of DO blocks / function bodies / embedded statements the walker follows. */
const MAX_NESTING = 8;

/** Texts longer than this are not cached (they would pin memory; such texts are rare). */
const CACHE_TEXT_LIMIT = 64 * 1024;
/** The cache is emptied when it would hold more entries, or more characters of SQL text, than this. */
const CACHE_LIMIT = 10_000;
const CACHE_CHAR_LIMIT = 16 * 1024 * 1024;
const cache = new Map<string, Facts>();
let cachedChars = 0;

// ------------------------------------------------------------------------------------ API

// The parser (WebAssembly) is loaded by loadSqlParser() in src/sql/classify.ts, at gateway start.

/**
 * null if `sql` may run in this context, else a short human-readable description of what is
 * refused (e.g. 'SET ROLE', "set_config('role')", 'DISCARD ALL', 'writing setting "trustgate.identity"'),
 * worded to be followed by "is not allowed …".
 */
export function findIdentityTamper(sql: string, ctx: TamperContext): string | null {
  tamperStats.calls++;
  if (!SUSPECT.test(sql)) {
    tamperStats.skipped++;
    return null;
  }
  const facts = factsOf(sql);
  let refused = ALWAYS;
  if (ctx.trustedUser || ctx.proxyActive) refused |= TRUSTED;
  if (ctx.proxyActive) refused |= PROXY;
  const hit = facts.mask & refused;
  if (hit === 0) return null;
  const first = 31 - Math.clz32(hit & -hit);
  return facts.reasons[first] ?? 'changing the session identity';
}

/** Forgets cached findings (tests). */
export function clearTamperCache(): void {
  cache.clear();
  cachedChars = 0;
}

// ------------------------------------------------------------------------------------ facts

function factsOf(sql: string): Facts {
  const hit = cache.get(sql);
  if (hit) {
    tamperStats.cacheHits++;
    return hit;
  }
  tamperStats.parsed++;
  const walker = new Walker();
  try {
    walker.sqlText(sql, 0, '');
  } catch (err) {
    if (err instanceof Error && /not initialized/i.test(err.message)) {
      // Fail closed, and do not cache: the next call may find the parser loaded.
      return { mask: bit(Fact.UnverifiableAlways), reasons: reasonsWith(Fact.UnverifiableAlways, 'SQL text (the SQL parser is not loaded)') };
    }
    // Too deep for the parser's or the walker's stack, or the parser ran out of memory:
    // PostgreSQL may still accept the text, so nothing found so far can be trusted to be all.
    walker.unverifiable(sql, 'SQL text too complex to verify');
  }
  const facts: Facts = walker.mask === 0 ? NO_FACTS : { mask: walker.mask, reasons: walker.reasons };
  if (sql.length <= CACHE_TEXT_LIMIT) {
    if (cache.size >= CACHE_LIMIT || cachedChars + sql.length > CACHE_CHAR_LIMIT) clearTamperCache();
    cache.set(sql, facts);
    cachedChars += sql.length;
  }
  return facts;
}

function reasonsWith(f: Fact, reason: string): string[] {
  const r: string[] = [];
  r[f] = reason;
  return r;
}

type Node = Record<string, unknown>;

function isObject(v: unknown): v is Node {
  return typeof v === 'object' && v !== null;
}

/** A syntax error: PostgreSQL's parser (the same grammar) rejects the text as well. */
function isSyntaxError(err: unknown): boolean {
  return err instanceof Error && err.name === 'SqlError' && !/stack depth|out of memory/i.test(err.message);
}

/** A failure that says nothing about the text: propagate it (fail closed at the top). */
function isFatal(err: unknown): boolean {
  return err instanceof RangeError || (err instanceof Error && /not initialized|memory/i.test(err.message));
}

/** Last part of a qualified name (function, relation), folded as PostgreSQL folds GUC names. */
function lastName(parts: unknown): string {
  if (!Array.isArray(parts) || parts.length === 0) return '';
  const last = parts[parts.length - 1] as { String?: { sval?: string } } | undefined;
  return foldIdentifier(last?.String?.sval ?? '');
}

/** The text of a string constant node (after the parser resolved quoting and escapes). */
function stringConstant(node: unknown): string | undefined {
  if (!isObject(node)) return undefined;
  const c = node.A_Const as Node | undefined;
  if (!c || !isObject(c.sval)) return undefined;
  return String((c.sval as Node).sval ?? '');
}

/** A constant as PostgreSQL would read it as a setting value (strings, numbers, booleans). */
function constantText(node: unknown): string | undefined {
  if (!isObject(node)) return undefined;
  const c = node.A_Const as Node | undefined;
  if (!c) return undefined;
  if (isObject(c.sval)) return String((c.sval as Node).sval ?? '');
  if (isObject(c.ival)) return String((c.ival as Node).ival ?? 0);
  if (isObject(c.fval)) return String((c.fval as Node).fval ?? '');
  if (isObject(c.boolval)) return (c.boolval as Node).boolval === true ? 'true' : 'false';
  return undefined;
}

function isPgSettings(rel: unknown): boolean {
  return isObject(rel) && typeof rel.relname === 'string' && foldIdentifier(rel.relname) === 'pg_settings';
}

/** Does the tree read pg_settings anywhere (FROM, JOIN, subquery, CTE)? */
function mentionsPgSettings(node: unknown): boolean {
  if (Array.isArray(node)) return node.some(mentionsPgSettings);
  if (!isObject(node)) return false;
  if (isObject(node.RangeVar) && isPgSettings(node.RangeVar)) return true;
  return Object.values(node).some((v) => isObject(v) && mentionsPgSettings(v));
}

/** Is this value safe for a setting that changes how the server lexes SQL? */
function lexerValueSafe(setting: string, value: string | undefined): boolean {
  if (value === undefined) return false;
  if (setting === 'standard_conforming_strings') return BOOL_TRUE.has(foldIdentifier(value));
  const normalised = value.replace(/[^A-Za-z0-9]/g, '').toLowerCase();
  return !CLIENT_ONLY_ENCODINGS.has(normalised);
}

const LEXER_SETTINGS = new Set(['standard_conforming_strings', 'client_encoding']);

/** Where a VariableSetStmt sits: '' = it acts on the session; else the statement that holds it. */
type SetPlace = '' | 'ALTER ROLE …' | 'ALTER DATABASE …' | 'ALTER SYSTEM' | 'function';

class Walker {
  mask = 0;
  readonly reasons: string[] = [];

  private note(f: Fact, reason: string): void {
    const b = bit(f);
    if ((this.mask & b) !== 0) return;
    this.mask |= b;
    this.reasons[f] = reason;
  }

  /** The text cannot be verified: refused for trusted users, and for everyone if it may touch trustgate's settings. */
  unverifiable(text: string, reason: string): void {
    this.note(Fact.Unverifiable, reason);
    if (ALWAYS_SUSPECT.test(text) || (GATEWAY_NAME.test(text) && GATEWAY_VERB.test(text))) this.note(Fact.UnverifiableAlways, reason);
  }

  /**
   * Checks one SQL text (possibly several statements). `where` is appended to reasons (' in DO
   * block'). Returns false when the text does not parse.
   */
  sqlText(text: string, depth: number, where: string): boolean {
    if (depth > MAX_NESTING) {
      this.unverifiable(text, `SQL nested too deeply to verify${where}`);
      return true;
    }
    let tree: unknown;
    try {
      tree = parseSync(text);
    } catch (err) {
      if (isSyntaxError(err)) return false;
      throw err;
    }
    const stmts = ((tree as Node).stmts as Node[] | undefined) ?? [];
    let bytes: Buffer | undefined;
    const statementText = (raw: Node): string => {
      bytes ??= Buffer.from(text, 'utf8');
      const start = Number(raw.stmt_location ?? 0);
      const len = Number(raw.stmt_len ?? 0);
      return bytes.subarray(start, len > 0 ? start + len : bytes.length).toString('utf8');
    };
    for (const raw of stmts) {
      const stmt = raw.stmt as Node | undefined;
      if (!stmt) continue;
      // DO and CREATE FUNCTION occur only as whole statements; their bodies need the statement text.
      if (isObject(stmt.DoStmt)) this.doBlock(stmt.DoStmt, () => statementText(raw), depth);
      if (isObject(stmt.CreateFunctionStmt)) this.functionBody(stmt.CreateFunctionStmt, () => statementText(raw), depth);
      this.walk(stmt, '', where);
    }
    return true;
  }

  /** Depth-first walk over a raw parse tree. */
  private walk(node: unknown, place: SetPlace, where: string): void {
    if (Array.isArray(node)) {
      for (const n of node) this.walk(n, place, where);
      return;
    }
    if (!isObject(node)) return;
    for (const [key, value] of Object.entries(node)) {
      if (!isObject(value)) continue;
      let inner: SetPlace = place;
      switch (key) {
        case 'VariableSetStmt':
        case 'setstmt': // ALTER ROLE|DATABASE|SYSTEM … SET: the VariableSetStmt's fields, unwrapped
          this.variableSet(value, place, where);
          break;
        case 'AlterRoleSetStmt':
          inner = 'ALTER ROLE …';
          break;
        case 'AlterDatabaseSetStmt':
          inner = 'ALTER DATABASE …';
          break;
        case 'AlterSystemStmt':
          inner = 'ALTER SYSTEM';
          break;
        case 'CreateFunctionStmt':
        case 'AlterFunctionStmt':
          inner = 'function';
          break;
        case 'sql_body': // BEGIN ATOMIC … END: statements, not SET clauses
          inner = '';
          break;
        case 'DiscardStmt':
          if (value.target === 'DISCARD_ALL') this.note(Fact.SessionReset, `DISCARD ALL${where}`);
          break;
        case 'FuncCall':
        case 'funccall': // CALL f(…): the FuncCall's fields, unwrapped
          this.funcCall(value, where);
          break;
        case 'UpdateStmt':
          if (isPgSettings(value.relation)) this.note(Fact.PgSettingsWrite, `UPDATE pg_settings${where}`);
          break;
        case 'InsertStmt':
          if (isPgSettings(value.relation)) this.note(Fact.PgSettingsWrite, `INSERT INTO pg_settings${where}`);
          break;
        case 'DeleteStmt':
          if (isPgSettings(value.relation)) this.note(Fact.PgSettingsWrite, `DELETE FROM pg_settings${where}`);
          break;
        case 'MergeStmt':
          if (isPgSettings(value.relation)) this.note(Fact.PgSettingsWrite, `MERGE INTO pg_settings${where}`);
          break;
        case 'ViewStmt':
          // An updatable view over pg_settings passes UPDATEs on to pg_settings' set_config rule.
          if (mentionsPgSettings(value.query)) this.note(Fact.OpaqueSetConfig, `CREATE VIEW over pg_settings${where}`);
          break;
        case 'CopyStmt':
          if (value.is_from === true && isPgSettings(value.relation)) this.note(Fact.PgSettingsWrite, `COPY pg_settings FROM${where}`);
          break;
        case 'ExecuteStmt': // also EXPLAIN EXECUTE, CREATE TABLE … AS EXECUTE
          this.gatewayStatement('EXECUTE', value.name, where);
          break;
        case 'PrepareStmt':
          this.gatewayStatement('PREPARE', value.name, where);
          break;
        case 'DeallocateStmt': // DEALLOCATE ALL has no name
          this.gatewayStatement('DEALLOCATE', value.name, where);
          break;
      }
      if (key === 'CreateFunctionStmt' || key === 'AlterFunctionStmt') {
        // SUPPORT support_function (CREATE: options; ALTER: actions)
        for (const list of [value.options, value.actions]) {
          for (const o of Array.isArray(list) ? list : []) {
            const d = isObject(o) ? (o.DefElem as Node | undefined) : undefined;
            if (d?.defname === 'support') this.supportFunctions(d.arg, where);
          }
        }
      } else if (!(key === 'DefineStmt' && value.kind === 'OBJECT_COLLATION')) {
        // (CREATE COLLATION's definition names no functions.)
        const fields = Object.hasOwn(SUPPORT_FUNCTION_FIELDS, key) ? SUPPORT_FUNCTION_FIELDS[key] : undefined;
        if (fields) for (const f of fields) this.supportFunctions(value[f], where);
      }
      this.walk(value, inner, where);
    }
  }

  /** SQL-level EXECUTE / PREPARE / DEALLOCATE: refused for the gateway's tg_ statement names. */
  private gatewayStatement(verb: string, name: unknown, where: string): void {
    if (typeof name !== 'string') return;
    // The parser folded an unquoted name; a quoted "TG_X" is another name, refused all the same.
    if (foldIdentifier(name).startsWith(GATEWAY_STATEMENT_PREFIX)) {
      this.note(Fact.GatewayStatement, `${verb} of trustgate's statement "${name}"${where}`);
    }
  }

  /**
   * Names a DDL statement gives as support functions: any String in the subtree whose value (or
   * last dotted part: a string-constant name is one identifier, but be safe) is set_config or a
   * built-in that runs SQL text.
   */
  private supportFunctions(node: unknown, where: string): void {
    if (Array.isArray(node)) {
      for (const n of node) this.supportFunctions(n, where);
      return;
    }
    if (!isObject(node)) return;
    const str = node.String as Node | undefined;
    if (isObject(str) && typeof str.sval === 'string') {
      const full = foldIdentifier(str.sval);
      const last = full.slice(full.lastIndexOf('.') + 1);
      for (const name of new Set([full, last])) {
        if (name === 'set_config') this.note(Fact.OpaqueSetConfig, `set_config used as a support function${where}`);
        else if (DYNAMIC_FUNCTIONS.has(name)) this.note(Fact.DynamicSql, `${name} used as a support function${where}`);
      }
    }
    for (const v of Object.values(node)) if (isObject(v)) this.supportFunctions(v, where);
  }

  private variableSet(v: Node, place: SetPlace, where: string): void {
    const kind = String(v.kind ?? '');
    if (kind === 'VAR_RESET_ALL') {
      // ALTER ROLE … RESET ALL / ALTER FUNCTION … RESET ALL change defaults, not this session.
      if (place === '') this.note(Fact.SessionReset, `RESET ALL${where}`);
      return;
    }
    if (kind === 'VAR_SET_MULTI') return; // SET TRANSACTION …, SET SESSION CHARACTERISTICS …
    // PostgreSQL compares setting names case-insensitively (ASCII): SET "Role" is SET role.
    const name = foldIdentifier(String(v.name ?? ''));
    const verb = kind === 'VAR_RESET' ? 'RESET' : 'SET';
    if (name.startsWith('trustgate.')) {
      this.note(Fact.TrustgateSetting, `writing setting "${name}"${where}`);
    } else if (IDENTITY_SETTINGS.has(name)) {
      let what: string;
      if (place === '') {
        const local = v.is_local === true ? ' LOCAL' : '';
        what = `${verb}${local} ${name === 'role' ? 'ROLE' : 'SESSION AUTHORIZATION'}`;
      } else {
        what = `${place} ${verb} ${name}`;
      }
      this.note(Fact.RoleChange, `${what}${where}`);
    } else if (LEXER_SETTINGS.has(name) && kind === 'VAR_SET_VALUE') {
      // RESET / SET … TO DEFAULT return to the connection's start-up value, which the gateway chose.
      const args = (v.args as unknown[] | undefined) ?? [];
      const value = args.length === 1 ? constantText(args[0]) : undefined;
      if (!lexerValueSafe(name, value)) {
        const what = place === '' ? `SET ${name}` : `${place} SET ${name}`;
        this.note(Fact.LexerSetting, `${what}${value !== undefined ? ` = '${value}'` : ''}${where}`);
      }
    }
  }

  private funcCall(call: Node, where: string): void {
    const name = lastName(call.funcname);
    if (name === 'set_config') {
      this.setConfig(call, where);
      return;
    }
    if (DYNAMIC_FUNCTIONS.has(name)) {
      const args = (call.args as unknown[] | undefined) ?? [];
      if (name !== 'ts_rewrite' || args.length === 2) this.note(Fact.DynamicSql, `dynamic SQL (${name})${where}`);
    }
  }

  /** set_config(setting_name, new_value, is_local), positional or named arguments. */
  private setConfig(call: Node, where: string): void {
    if (call.func_variadic === true) {
      this.note(Fact.OpaqueSetConfig, `set_config with a non-constant setting name${where}`);
      return;
    }
    const nameArg = argument(call, 0, 'setting_name');
    if (nameArg === undefined) return; // no arguments: PostgreSQL rejects the call
    const raw = stringConstant(nameArg);
    if (raw === undefined) {
      // A parameter, a column, an expression: its value cannot be known here.
      this.note(Fact.OpaqueSetConfig, `set_config with a non-constant setting name${where}`);
      return;
    }
    const name = foldIdentifier(raw);
    if (name.startsWith('trustgate.')) {
      this.note(Fact.TrustgateSetting, `writing setting "${name}"${where}`);
    } else if (IDENTITY_SETTINGS.has(name)) {
      this.note(Fact.RoleChange, `set_config('${name}')${where}`);
    } else if (LEXER_SETTINGS.has(name)) {
      const value = constantText(argument(call, 1, 'new_value'));
      if (!lexerValueSafe(name, value)) this.note(Fact.LexerSetting, `set_config('${name}')${where}`);
    }
  }

  // ---------------------------------------------------------------------------- DO blocks

  private doBlock(stmt: Node, statementText: () => string, depth: number): void {
    let language = 'plpgsql';
    let body = '';
    for (const a of (stmt.args as Node[] | undefined) ?? []) {
      const d = a.DefElem as Node | undefined;
      const sval = String(((d?.arg as Node | undefined)?.String as Node | undefined)?.sval ?? '');
      if (d?.defname === 'language') language = sval;
      else if (d?.defname === 'as') body = sval;
    }
    // Language names are not folded by PostgreSQL's lookup once the parser produced them.
    if (language !== 'plpgsql') {
      this.note(Fact.Unverifiable, `DO block in language "${language}"`);
      return;
    }
    if (depth + 1 > MAX_NESTING) {
      this.unverifiable(body, 'DO block nested too deeply to verify');
      return;
    }
    let tree: unknown;
    try {
      tree = parsePlPgSQLSync(statementText());
    } catch (err) {
      if (isFatal(err)) throw err;
      // PostgreSQL may compile what this parser cannot (it resolves %ROWTYPE fields from the catalog).
      if (plSuspect(body)) this.unverifiable(body, 'DO block that cannot be verified');
      return;
    }
    this.walkPl(tree, depth + 1, ' in DO block');
  }

  /**
   * Bodies of functions and procedures created in this text. PL/pgSQL bodies are always parsed:
   * EXECUTE needs no suspect word. Other languages than sql and plpgsql are refused (trusted users).
   */
  private functionBody(stmt: Node, statementText: () => string, depth: number): void {
    let language: string | undefined;
    let body: string | undefined;
    for (const o of (stmt.options as Node[] | undefined) ?? []) {
      const d = o.DefElem as Node | undefined;
      if (!d) continue;
      const arg = d.arg as Node | undefined;
      if (d.defname === 'language') language = String((arg?.String as Node | undefined)?.sval ?? '');
      else if (d.defname === 'as') {
        const items = ((arg?.List as Node | undefined)?.items as Node[] | undefined) ?? [];
        const first = items[0]?.String as Node | undefined;
        if (items.length === 1 && first) body = String(first.sval ?? '');
      }
    }
    // No LANGUAGE: BEGIN ATOMIC is sql (walked as statements); an AS body is rejected by PostgreSQL.
    if (language === undefined) return;
    // PostgreSQL looks the language name up as written (an unquoted one arrives folded).
    if (!CHECKED_LANGUAGES.has(language)) {
      this.note(Fact.Unverifiable, `${stmt.is_procedure === true ? 'procedure' : 'function'} in language "${language}"`);
      return;
    }
    if (body === undefined) return;
    const where = ' in function body';
    if (language === 'sql') {
      if (!SUSPECT.test(body)) return;
      if (depth + 1 > MAX_NESTING) this.unverifiable(body, `function body nested too deeply to verify`);
      else this.sqlText(body, depth + 1, where);
      return;
    }
    const suspect = plSuspect(body);
    if (depth + 1 > MAX_NESTING) {
      if (suspect) this.unverifiable(body, 'function body nested too deeply to verify');
      return;
    }
    let tree: unknown;
    try {
      tree = parsePlPgSQLSync(statementText());
    } catch (err) {
      if (isFatal(err)) throw err;
      // As for DO blocks: PostgreSQL may compile what this parser cannot.
      if (suspect) this.unverifiable(body, 'function body that cannot be verified');
      return;
    }
    this.walkPl(tree, depth + 1, where);
  }

  /** Walks a PL/pgSQL parse tree: every embedded expression and statement, and dynamic SQL. */
  private walkPl(node: unknown, depth: number, where: string): void {
    if (Array.isArray(node)) {
      for (const n of node) this.walkPl(n, depth, where);
      return;
    }
    if (!isObject(node)) return;
    for (const [key, value] of Object.entries(node)) {
      if (!isObject(value)) continue;
      if (key === 'PLpgSQL_expr') {
        this.plExpression(value.query, Number(value.parseMode ?? 0), depth, where);
        continue;
      }
      // EXECUTE …, FOR … IN EXECUTE …, OPEN … FOR EXECUTE …, RETURN QUERY EXECUTE …
      if (key === 'PLpgSQL_stmt_dynexecute' || key === 'PLpgSQL_stmt_dynfors' || key === 'dynquery') {
        this.note(Fact.DynamicSql, `dynamic SQL (EXECUTE)${where}`);
      }
      this.walkPl(value, depth, where);
    }
  }

  /**
   * One PL/pgSQL expression or statement, by the parse mode PostgreSQL uses for it:
   * 0 a statement, 2 an expression (SELECT without the keyword), 3–5 an assignment `target := expr`,
   * 1 a type name.
   */
  private plExpression(query: unknown, mode: number, depth: number, where: string): void {
    if (typeof query !== 'string' || !SUSPECT.test(query)) return;
    const pieces: string[] = [];
    if (mode === 0) pieces.push(query);
    else if (mode === 2) pieces.push(`SELECT ${query}\n`);
    else if (mode >= 3 && mode <= 5) {
      const split = splitAssignment(query);
      if (!split) {
        this.unverifiable(query, `statement that cannot be verified${where}`);
        return;
      }
      pieces.push(`SELECT ${split[0]}\n`, `SELECT ${split[1]}\n`);
    } else return;
    for (const piece of pieces) {
      if (!SUSPECT.test(piece)) continue;
      if (!this.sqlText(piece, depth + 1, where)) this.unverifiable(piece, `statement that cannot be verified${where}`);
    }
  }
}

/**
 * Could a PL/pgSQL body the parser cannot read hide something refused? It could if it contains a
 * suspect word or EXECUTE (dynamic SQL) / PREPARE / DEALLOCATE. `tg_` alone does not count here: in
 * PL/pgSQL it is mostly a trigger variable (TG_OP), and a tg_ statement needs one of the keywords.
 */
function plSuspect(body: string): boolean {
  return GATEWAY_VERB.test(body) || SUSPECT.test(body.replace(/tg_/gi, ''));
}

/** An argument of a call by position, or by name (named notation). */
function argument(call: Node, position: number, name: string): unknown {
  const args = (call.args as unknown[] | undefined) ?? [];
  for (const a of args) {
    const named = isObject(a) ? (a.NamedArgExpr as Node | undefined) : undefined;
    if (named && foldIdentifier(String(named.name ?? '')) === name) return named.arg;
  }
  const a = args[position];
  if (isObject(a) && a.NamedArgExpr) return undefined;
  return a;
}

/**
 * Splits a PL/pgSQL assignment `target[subscripts].field := expression` at its `:=` (or `=`) outside
 * brackets: [target, expression]. Subscripts are expressions too, so both halves are checked.
 */
function splitAssignment(query: string): [string, string] | undefined {
  let tokens: { start: number; end: number; text: string }[];
  try {
    tokens = scanSync(query).tokens;
  } catch (err) {
    if (isFatal(err)) throw err;
    return undefined;
  }
  let depth = 0;
  for (const t of tokens) {
    if (t.text === '(' || t.text === '[') depth++;
    else if (t.text === ')' || t.text === ']') depth--;
    else if (depth === 0 && (t.text === ':=' || t.text === '=')) {
      const bytes = Buffer.from(query, 'utf8');
      return [bytes.subarray(0, t.start).toString('utf8'), bytes.subarray(t.end).toString('utf8')];
    }
  }
  return undefined;
}
