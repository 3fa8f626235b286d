/**
 * The identity mapping of trusted sessions, cell by cell, through trustgate with node-postgres in
 * both pool modes: for each CONNECT THROUGH rule kind and each ProxyRole form, what the pooled
 * connection becomes (CURRENT_USER), which privileges are in effect, who owns what it creates,
 * what the identity functions report, or exactly which error is raised.
 *
 * MAPPING below is the table of docs/trusted-sessions.md, "Identity mapping", row for row: keep
 * the two identical.
 *
 * The world: trusted user `app_tier`; roles r1, r2 and inh; permanent users p_without, p_one,
 * p_two (each a member of inh, which they inherit); tables readable only through r1 (t_r1), only
 * through r2 (t_r2), only by the permanent users themselves (t_self), only through inh (t_inh).
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import pg from 'pg';
import { preparePostgres, startGateway, stackOf, type Stack } from './helpers/stack.js';
import { setupTrustWorld } from './helpers/trust.js';

const MODES = ['transaction', 'session'] as const;

/** trustgate's union role of a rule with these roles (catalog-sql.ts, union_role_name). */
function unionRoleName(roles: string[]): string {
  const sorted = [...new Set(roles)].sort();
  return `tg_union_${createHash('sha256').update(sorted.join(','), 'utf8').digest('hex').slice(0, 16)}`;
}
const UNION_R1_R2 = unionRoleName(['r1', 'r2']);

const TABLES = ['t_r1', 't_r2', 't_self', 't_inh'] as const;
type Table = (typeof TABLES)[number];

const MAPPING_SETUP_SQL = `
CREATE ROLE r1 NOLOGIN;
CREATE ROLE r2 NOLOGIN;
CREATE ROLE inh NOLOGIN;
CREATE ROLE p_without LOGIN;
CREATE ROLE p_one LOGIN;
CREATE ROLE p_two LOGIN;
GRANT inh TO p_without, p_one, p_two;
GRANT r1, r2, inh, p_without, p_one, p_two TO secadm WITH ADMIN OPTION;
CREATE SCHEMA mapping;
GRANT USAGE ON SCHEMA mapping TO PUBLIC;
GRANT CREATE ON SCHEMA mapping TO r1, r2, inh, p_without, p_one, p_two;
CREATE TABLE mapping.t_r1 (v text);
CREATE TABLE mapping.t_r2 (v text);
CREATE TABLE mapping.t_self (v text);
CREATE TABLE mapping.t_inh (v text);
INSERT INTO mapping.t_r1 VALUES ('r1');
INSERT INTO mapping.t_r2 VALUES ('r2');
INSERT INTO mapping.t_self VALUES ('self');
INSERT INTO mapping.t_inh VALUES ('inh');
GRANT SELECT ON mapping.t_r1 TO r1;
GRANT SELECT ON mapping.t_r2 TO r2;
GRANT SELECT ON mapping.t_self TO p_without, p_one, p_two;
GRANT SELECT ON mapping.t_inh TO inh;
`;

/** The rules, one proxy user per rule kind, granted by a trustgate administrator. */
const RULES = [
  'GRANT CONNECT THROUGH app_tier TO PERMANENT p_without WITHOUT ROLE',
  'GRANT CONNECT THROUGH app_tier TO PERMANENT p_one WITH ROLE r1',
  'GRANT CONNECT THROUGH app_tier TO PERMANENT p_two WITH ROLE r1, r2',
  'GRANT CONNECT THROUGH app_tier TO app_one WITH ROLE r1',
  'GRANT CONNECT THROUGH app_tier TO app_two WITH ROLE r1, r2',
];

type RuleKind =
  | 'PERMANENT p_without WITHOUT ROLE'
  | 'PERMANENT p_one WITH ROLE r1'
  | 'PERMANENT p_two WITH ROLE r1, r2'
  | 'app_one WITH ROLE r1'
  | 'app_two WITH ROLE r1, r2';

type Form = 'omitted' | 'ALL' | 'NONE' | 'the proxy user itself' | 'a role the user is a member of' | 'a role in the rule' | 'a role not allowed';

interface Allowed {
  currentUser: string;
  reads: Table[];
  owner: string;
}
interface Refused {
  sqlstate: '42501' | '22023';
  /** 'band': SET QUERY_BAND is refused by trustgate; 'switch': by PostgreSQL, which trustgate asks before answering SET QUERY_BAND. */
  at: 'band' | 'switch';
  /** The whole error message. */
  message: string;
}
interface Cell {
  rule: RuleKind;
  form: Form;
  /** ProxyRole as written in the band; null when omitted. */
  proxyRole: string | null;
  expect: Allowed | Refused;
}

const proxyUserOf = (rule: RuleKind): string => /^(?:PERMANENT )?(\w+)/.exec(rule)![1];
const kindOf = (rule: RuleKind): string => (rule.startsWith('PERMANENT') ? 'permanent' : 'application');

const ok = (currentUser: string, reads: Table[]): Allowed => ({ currentUser, reads, owner: currentUser });
const NOT_IN_RULE = (role: string, user: string): Refused => ({
  sqlstate: '42501',
  at: 'band',
  message: `role "${role}" is not in the CONNECT THROUGH rule for proxy user "${user}" through trusted user "app_tier"`,
});
const NONE_REFUSED = (user: string, roles: string[]): Refused => ({
  sqlstate: '22023',
  at: 'band',
  message: `ProxyRole NONE is not allowed for proxy user "${user}": its CONNECT THROUGH rule through "app_tier" is WITH ROLE ${roles.map((r) => `"${r}"`).join(', ')}`,
});

/** docs/trusted-sessions.md, "Identity mapping": the same rows, in the same order. */
export const MAPPING: Cell[] = [
  // PERMANENT … WITHOUT ROLE: the permanent user itself, with its own privileges and what it inherits.
  { rule: 'PERMANENT p_without WITHOUT ROLE', form: 'omitted', proxyRole: null, expect: ok('p_without', ['t_self', 't_inh']) },
  { rule: 'PERMANENT p_without WITHOUT ROLE', form: 'ALL', proxyRole: 'ALL', expect: ok('p_without', ['t_self', 't_inh']) },
  { rule: 'PERMANENT p_without WITHOUT ROLE', form: 'NONE', proxyRole: 'NONE', expect: ok('p_without', ['t_self', 't_inh']) },
  { rule: 'PERMANENT p_without WITHOUT ROLE', form: 'the proxy user itself', proxyRole: 'p_without', expect: ok('p_without', ['t_self', 't_inh']) },
  { rule: 'PERMANENT p_without WITHOUT ROLE', form: 'a role the user is a member of', proxyRole: 'inh', expect: ok('inh', ['t_inh']) },
  {
    rule: 'PERMANENT p_without WITHOUT ROLE',
    form: 'a role not allowed',
    proxyRole: 'r2',
    expect: { sqlstate: '42501', at: 'switch', message: 'proxy user "p_without" is not a member of role "r2"' },
  },
  // PERMANENT … WITH ROLE r1: only r1, never the permanent user's own privileges.
  { rule: 'PERMANENT p_one WITH ROLE r1', form: 'omitted', proxyRole: null, expect: ok('r1', ['t_r1']) },
  { rule: 'PERMANENT p_one WITH ROLE r1', form: 'ALL', proxyRole: 'ALL', expect: ok('r1', ['t_r1']) },
  { rule: 'PERMANENT p_one WITH ROLE r1', form: 'NONE', proxyRole: 'NONE', expect: NONE_REFUSED('p_one', ['r1']) },
  { rule: 'PERMANENT p_one WITH ROLE r1', form: 'a role in the rule', proxyRole: 'r1', expect: ok('r1', ['t_r1']) },
  { rule: 'PERMANENT p_one WITH ROLE r1', form: 'a role not allowed', proxyRole: 'inh', expect: NOT_IN_RULE('inh', 'p_one') },
  // PERMANENT … WITH ROLE r1, r2: both roles at once through the union role, or one of them.
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'omitted', proxyRole: null, expect: ok(UNION_R1_R2, ['t_r1', 't_r2']) },
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'ALL', proxyRole: 'ALL', expect: ok(UNION_R1_R2, ['t_r1', 't_r2']) },
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'NONE', proxyRole: 'NONE', expect: NONE_REFUSED('p_two', ['r1', 'r2']) },
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'a role in the rule', proxyRole: 'r1', expect: ok('r1', ['t_r1']) },
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'a role in the rule', proxyRole: 'r2', expect: ok('r2', ['t_r2']) },
  { rule: 'PERMANENT p_two WITH ROLE r1, r2', form: 'a role not allowed', proxyRole: 'inh', expect: NOT_IN_RULE('inh', 'p_two') },
  // Application user WITH ROLE r1.
  { rule: 'app_one WITH ROLE r1', form: 'omitted', proxyRole: null, expect: ok('r1', ['t_r1']) },
  { rule: 'app_one WITH ROLE r1', form: 'ALL', proxyRole: 'ALL', expect: ok('r1', ['t_r1']) },
  { rule: 'app_one WITH ROLE r1', form: 'NONE', proxyRole: 'NONE', expect: NONE_REFUSED('app_one', ['r1']) },
  { rule: 'app_one WITH ROLE r1', form: 'a role in the rule', proxyRole: 'r1', expect: ok('r1', ['t_r1']) },
  { rule: 'app_one WITH ROLE r1', form: 'a role not allowed', proxyRole: 'r2', expect: NOT_IN_RULE('r2', 'app_one') },
  // Application user WITH ROLE r1, r2.
  { rule: 'app_two WITH ROLE r1, r2', form: 'omitted', proxyRole: null, expect: ok(UNION_R1_R2, ['t_r1', 't_r2']) },
  { rule: 'app_two WITH ROLE r1, r2', form: 'ALL', proxyRole: 'ALL', expect: ok(UNION_R1_R2, ['t_r1', 't_r2']) },
  { rule: 'app_two WITH ROLE r1, r2', form: 'NONE', proxyRole: 'NONE', expect: NONE_REFUSED('app_two', ['r1', 'r2']) },
  { rule: 'app_two WITH ROLE r1, r2', form: 'a role in the rule', proxyRole: 'r1', expect: ok('r1', ['t_r1']) },
  { rule: 'app_two WITH ROLE r1, r2', form: 'a role in the rule', proxyRole: 'r2', expect: ok('r2', ['t_r2']) },
  { rule: 'app_two WITH ROLE r1, r2', form: 'a role not allowed', proxyRole: 'inh', expect: NOT_IN_RULE('inh', 'app_two') },
];

async function client(stack: Stack, user: string): Promise<pg.Client> {
  const c = new pg.Client(stack.clientConfig(user));
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function refused(promise: Promise<unknown>, code: string, message?: RegExp | string): Promise<void> {
  await assert.rejects(promise, (err: Error & { code?: string }) => {
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (typeof message === 'string') assert.equal(err.message, message);
    else if (message) assert.match(err.message, message);
    return true;
  });
}

/** One row of the docs table (docs/trusted-sessions.md, "Identity mapping"): its cells as written there. */
function docsRow(cell: Cell): string[] {
  const e = cell.expect;
  const role = cell.proxyRole === null ? 'omitted' : cell.form === 'ALL' || cell.form === 'NONE' ? `\`${cell.proxyRole}\`` : `\`${cell.proxyRole}\` (${cell.form})`;
  if ('sqlstate' in e) {
    const at = e.at === 'band' ? 'at SET QUERY_BAND' : 'by PostgreSQL, at SET QUERY_BAND';
    return [`\`${cell.rule}\``, role, '—', '—', '—', `${e.sqlstate} ${at}: \`${e.message}\``];
  }
  return [`\`${cell.rule}\``, role, `\`${e.currentUser}\``, `\`${e.owner}\``, e.reads.map((t) => `\`${t}\``).join(', '), '—'];
}

const WHO =
  'SELECT current_user AS cu, session_user AS su, trustgate.trusted_user() AS tu, trustgate.proxy_user() AS pu, trustgate.proxy_role() AS pr, trustgate.proxy_kind() AS pk';

const bandOf = (cell: Cell): string =>
  `SET QUERY_BAND = 'ProxyUser=${proxyUserOf(cell.rule)};${cell.proxyRole === null ? '' : `ProxyRole=${cell.proxyRole};`}' FOR TRANSACTION`;

describe('identity mapping: test data', () => {
  it('covers every ProxyRole form for every rule kind', () => {
    const kinds = [...new Set(MAPPING.map((c) => c.rule))];
    assert.equal(kinds.length, 5);
    for (const kind of kinds) {
      const forms = new Set(MAPPING.filter((c) => c.rule === kind).map((c) => c.form));
      for (const f of ['omitted', 'ALL', 'NONE', 'a role not allowed'] as const) assert.ok(forms.has(f), `${kind}: ${f}`);
      assert.ok(forms.has(kind.includes('WITHOUT ROLE') ? 'a role the user is a member of' : 'a role in the rule'), kind);
    }
    assert.equal(UNION_R1_R2, 'tg_union_6515807ca37eec8b');
  });

  it('is the table of docs/trusted-sessions.md, row for row', () => {
    const doc = fs.readFileSync(new URL('../docs/trusted-sessions.md', import.meta.url), 'utf8');
    const rows = doc
      .split('\n')
      .filter((l) => /^\| `(PERMANENT p_|app_)/.test(l))
      .map((l) => l.split(' | ').map((c) => c.replace(/^\| /, '').replace(/ \|$/, '')));
    assert.deepEqual(rows, MAPPING.map(docsRow));
  });
});

for (const mode of MODES) {
  describe(`identity mapping: rule kind × ProxyRole (${mode} mode)`, () => {
    let stack: Stack;
    let admin: pg.Client;
    let app: pg.Client;
    let createdSeq = 0;

    before(async () => {
      const db = await preparePostgres();
      await setupTrustWorld(db);
      await db.query(MAPPING_SETUP_SQL);
      const { gw, logs } = await startGateway(db, { pool: { mode, default_size: 2 } });
      stack = stackOf(db, gw, logs, true);
      admin = await client(stack, 'secadm');
      for (const rule of RULES) assert.equal((await admin.query(rule)).command, 'GRANT', rule);
      app = await client(stack, 'app_tier');
    });
    after(async () => {
      await admin?.end().catch(() => undefined);
      await app?.end().catch(() => undefined);
      await stack?.stop();
    });

    it('keeps one rule per proxy user, the two-role rules sharing one union role', async () => {
      const rows = (
        await admin.query("SELECT proxy_user, kind, without_role, roles, union_role FROM trustgate.connect_rules WHERE status = 'granted' AND trusted_user = 'app_tier' ORDER BY proxy_user")
      ).rows;
      assert.deepEqual(rows, [
        { proxy_user: 'app_one', kind: 'application', without_role: false, roles: ['r1'], union_role: null },
        { proxy_user: 'app_two', kind: 'application', without_role: false, roles: ['r1', 'r2'], union_role: UNION_R1_R2 },
        { proxy_user: 'p_one', kind: 'permanent', without_role: false, roles: ['r1'], union_role: null },
        { proxy_user: 'p_two', kind: 'permanent', without_role: false, roles: ['r1', 'r2'], union_role: UNION_R1_R2 },
        { proxy_user: 'p_without', kind: 'permanent', without_role: true, roles: [], union_role: null },
      ]);
      // The trusted user's own connection holds every membership with SET only: no privilege of its own.
      const members = (
        await stack.pg.query(
          "SELECT r.rolname::text AS role, m.inherit_option, m.set_option FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE m.member = 'app_tier'::regrole ORDER BY 1",
        )
      ).map((r) => [r.role, r.inherit_option, r.set_option]);
      assert.deepEqual(members, [
        ['p_without', false, true],
        ['r1', false, true],
        ['r2', false, true],
        [UNION_R1_R2, false, true],
      ]);
      const own = await app.query(`SELECT ${TABLES.map((t) => `has_table_privilege('mapping.${t}', 'SELECT') AS ${t}`).join(', ')}`);
      assert.deepEqual(own.rows[0], { t_r1: false, t_r2: false, t_self: false, t_inh: false });
    });

    for (const cell of MAPPING) {
      const user = proxyUserOf(cell.rule);
      it(`${cell.rule} × ProxyRole ${cell.proxyRole ?? 'omitted'} (${cell.form})`, async () => {
        await app.query('BEGIN');
        try {
          const e = cell.expect;
          if ('sqlstate' in e) {
            // Refused by SET QUERY_BAND itself (for 'switch', PostgreSQL's check, which trustgate
            // runs before answering); inside the transaction block that aborts it.
            await refused(app.query(bandOf(cell)), e.sqlstate, e.message);
            if (e.at === 'switch') await refused(app.query('SELECT 1'), '25P02');
            return;
          }
          assert.equal((await app.query(bandOf(cell))).command, 'SET');
          const who = (await app.query(WHO)).rows[0];
          assert.deepEqual(who, { cu: e.currentUser, su: 'app_tier', tu: 'app_tier', pu: user, pr: cell.proxyRole, pk: kindOf(cell.rule) });
          // Which SELECTs succeed: each in a savepoint, so a refusal does not end the transaction.
          const reads: Table[] = [];
          for (const t of TABLES) {
            await app.query('SAVEPOINT probe');
            try {
              const r = await app.query(`SELECT v FROM mapping.${t}`);
              assert.equal(r.rows.length, 1);
              reads.push(t);
              await app.query('RELEASE SAVEPOINT probe');
            } catch (err) {
              assert.equal((err as { code?: string }).code, '42501', `${t}: ${(err as Error).message}`);
              await app.query('ROLLBACK TO SAVEPOINT probe');
            }
          }
          assert.deepEqual(reads, e.reads);
          // Still the same identity after the rolled-back savepoints.
          assert.equal((await app.query('SELECT current_user AS cu')).rows[0].cu, e.currentUser);
          const table = `created_${mode}_${++createdSeq}`;
          await app.query(`CREATE TABLE mapping.${table} (i int)`);
          const owner = (await app.query(`SELECT tableowner FROM pg_tables WHERE schemaname = 'mapping' AND tablename = '${table}'`)).rows[0]?.tableowner;
          assert.equal(owner, e.owner);
        } finally {
          await app.query('ROLLBACK');
          // The proxy ended with the transaction; nothing created stays.
          assert.deepEqual((await app.query(WHO)).rows[0], { cu: 'app_tier', su: 'app_tier', tu: null, pu: null, pr: null, pk: null });
        }
      });
    }

    it('a FOR SESSION ProxyRole the permanent user is not a member of is refused and leaves the session exactly as before', async () => {
      await app.query("SET QUERY_BAND = 'ProxyUser=p_without;' FOR SESSION");
      try {
        assert.equal((await app.query(WHO)).rows[0].cu, 'p_without');
        // Refused by SET QUERY_BAND itself (PostgreSQL checks the membership before trustgate answers) …
        await refused(app.query("SET QUERY_BAND = 'ProxyUser=p_without;ProxyRole=r2;' FOR SESSION"), '42501', /proxy user "p_without" is not a member of role "r2"/);
        // … and afterwards the session is as it was before the refused band: p_without, requests run.
        const who = await app.query(WHO).then(
          (r) => r.rows[0],
          (err: Error & { code?: string }) => ({ error: `${err.code}: ${err.message}` }),
        );
        assert.deepEqual(who, { cu: 'p_without', su: 'app_tier', tu: 'app_tier', pu: 'p_without', pr: null, pk: 'permanent' });
      } finally {
        await app.query('SET QUERY_BAND = NONE FOR SESSION');
      }
      assert.equal((await app.query(WHO)).rows[0].cu, 'app_tier');
    });

    it('left nothing behind: no table created in a cell exists', async () => {
      const rows = await stack.pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'mapping' AND tablename LIKE 'created%'");
      assert.deepEqual(rows, []);
    });
  });
}
