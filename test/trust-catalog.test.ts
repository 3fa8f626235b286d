/**
 * The trusted-sessions catalog inside a real PostgreSQL 18: CONNECT THROUGH rules, the role
 * memberships they create and revoke, the identity key, HMAC and identity functions.
 */
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import pgLib from 'pg';
import { startPostgres, type EmbeddedPostgres } from './helpers/postgres.js';
import { AUTH_PASSWORD, AUTH_ROLE, installTrustgate } from './helpers/stack.js';
import type { ConnectThroughStatement } from '../src/trust/connect-through.js';

const PW = 'pw';
let pg: EmbeddedPostgres;

/** What `trustgate init` runs (the same as test/helpers/stack.ts). */
const install = (): Promise<void> => installTrustgate(pg);

before(async () => {
  pg = await startPostgres();
  await install();
  await pg.query(`
    CREATE ROLE secadm LOGIN PASSWORD '${PW}' CREATEROLE IN ROLE trustgate_admin;
    CREATE ROLE secadm2 LOGIN PASSWORD '${PW}' CREATEROLE IN ROLE trustgate_admin;
    CREATE ROLE nonadm LOGIN PASSWORD '${PW}';
    CREATE ROLE pu1 LOGIN PASSWORD '${PW}';
    CREATE ROLE pu2 LOGIN PASSWORD '${PW}';
    CREATE ROLE r_a; CREATE ROLE r_b; CREATE ROLE r_c;
    CREATE ROLE su_user LOGIN SUPERUSER PASSWORD '${PW}';
    CREATE ROLE su_role NOLOGIN SUPERUSER;
    GRANT r_c TO pu2;
    CREATE TABLE ta (x int); CREATE TABLE tb (x int); CREATE TABLE tc (x int); CREATE TABLE tp (x int);
    GRANT SELECT ON ta TO r_a; GRANT SELECT ON tb TO r_b; GRANT SELECT ON tc TO r_c; GRANT SELECT ON tp TO pu1;
    GRANT r_a, r_b, r_c, pu1, pu2, su_role, su_user TO secadm WITH ADMIN TRUE, INHERIT FALSE, SET FALSE;
    GRANT r_a, r_b, pu1 TO secadm2 WITH ADMIN TRUE, INHERIT FALSE, SET FALSE;
    GRANT r_a TO nonadm WITH ADMIN TRUE, INHERIT FALSE, SET FALSE;
  `);
});
after(() => pg?.stop());

let trustedUsers = 0;
/** A fresh trusted user (LOGIN) for one test. */
async function trustedUser(): Promise<string> {
  const t = `tu_${++trustedUsers}`;
  await pg.query(`CREATE ROLE ${t} LOGIN PASSWORD '${PW}'`);
  return t;
}

const as = (user: string) => ({
  user,
  password: user === AUTH_ROLE ? AUTH_PASSWORD : user === pg.superuser ? pg.superuserPassword : PW,
});

function call(user: string, stmt: ConnectThroughStatement | Record<string, unknown>): Promise<unknown> {
  return pg.query('CALL trustgate.apply_connect_through($1::jsonb)', [JSON.stringify(stmt)], as(user));
}

async function rejects(p: Promise<unknown>, code: string, message?: RegExp): Promise<Error & { hint?: string }> {
  let caught: (Error & { code?: string; hint?: string }) | undefined;
  await p.then(
    () => undefined,
    (err: Error & { code?: string }) => (caught = err),
  );
  assert.ok(caught, `expected SQLSTATE ${code}, but it succeeded`);
  assert.equal(caught.code, code, caught.message);
  if (message) assert.match(caught.message, message);
  return caught;
}

interface Membership {
  role: string;
  grantor: string;
  admin_option: boolean;
  inherit_option: boolean;
  set_option: boolean;
}
async function memberships(member: string): Promise<Membership[]> {
  return pg.query(
    `SELECT r.rolname AS role, g.rolname AS grantor, m.admin_option, m.inherit_option, m.set_option
     FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles g ON g.oid = m.grantor
     WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = $1) ORDER BY 1, 2`,
    [member],
  );
}
const roleNames = async (member: string) => (await memberships(member)).map((m) => m.role);

async function rules(t: string): Promise<Record<string, any>[]> {
  return pg.query('SELECT * FROM trustgate.connect_rules WHERE trusted_user = $1 ORDER BY rule_id', [t], as('secadm'));
}
const active = async (t: string) => (await rules(t)).filter((r) => r.status === 'granted');

/** Runs fn on one connection of `user` (several statements on the same backend). */
async function withClient<T>(user: string, fn: (c: pgLib.Client) => Promise<T>): Promise<T> {
  const c = new pgLib.Client(pg.connectionConfig(as(user)));
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => undefined);
  }
}

/** The roles among `candidates` that `t` can SET ROLE to. */
async function settable(t: string, candidates: string[]): Promise<string[]> {
  return withClient(t, async (c) => {
    const ok: string[] = [];
    for (const r of candidates) {
      try {
        await c.query(`SET ROLE "${r}"`);
        ok.push(r);
      } catch (err) {
        assert.equal((err as { code?: string }).code, '42501');
      }
      await c.query('RESET ROLE');
    }
    return ok;
  });
}

const unionName = (roles: string[]) =>
  'tg_union_' + createHash('sha256').update([...roles].sort().join(','), 'utf8').digest('hex').slice(0, 16);
const CANDIDATES = ['pu1', 'pu2', 'r_a', 'r_b', 'r_c', 'secadm', 'trustgate_admin', 'su_role'];
const SET_ONLY = { admin_option: false, inherit_option: false, set_option: true };

describe('installer', () => {
  it('creates the catalog and can run again without changes', async () => {
    const key = async () => (await pg.query('SELECT trustgate.identity_key_for_gateway() AS k', [], as(AUTH_ROLE)))[0].k as Buffer;
    const before = await key();
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
    await install();
    assert.deepEqual(await key(), before);
    assert.equal(before.length, 32);
    assert.equal((await active(t)).length, 1);
    const [objects] = await pg.query(`SELECT
      to_regclass('trustgate.connect_rule') IS NOT NULL AND to_regclass('trustgate.connect_rules') IS NOT NULL
      AND to_regclass('trustgate.managed_membership') IS NOT NULL AND to_regclass('trustgate.identity_key') IS NOT NULL AS tables,
      to_regprocedure('trustgate.apply_connect_through(jsonb)') IS NOT NULL AS proc,
      (SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = 'trustgate_admin') AS admin_role`);
    assert.deepEqual(objects, { tables: true, proc: true, admin_role: true });
  });

  it('keeps the private tables private and the rules readable by admins and the auth role', async () => {
    await rejects(pg.query('SELECT * FROM trustgate.connect_rule', [], as('nonadm')), '42501');
    await rejects(pg.query('SELECT * FROM trustgate.connect_rules', [], as('nonadm')), '42501');
    await rejects(pg.query('SELECT * FROM trustgate.managed_membership', [], as('secadm')), '42501');
    await rejects(pg.query('SELECT * FROM trustgate.identity_key', [], as('secadm')), '42501');
    await rejects(pg.query('SELECT * FROM trustgate.identity_key', [], as(AUTH_ROLE)), '42501');
    await rejects(pg.query(`SELECT trustgate.sync_memberships('pu1')`, [], as('nonadm')), '42501');
    await rejects(pg.query(`SELECT trustgate.hmac_sha256('\\x01', '\\x02')`, [], as('secadm')), '42501');
    await rejects(pg.query(`INSERT INTO trustgate.connect_rule (trusted_user, kind) VALUES ('x', 'trust_only')`, [], as(AUTH_ROLE)), '42501');
    assert.ok(Array.isArray(await pg.query('SELECT * FROM trustgate.connect_rules', [], as(AUTH_ROLE))));
    assert.ok(Array.isArray(await pg.query('SELECT * FROM trustgate.connect_rule', [], as(AUTH_ROLE))));
  });
});

describe('GRANT CONNECT THROUGH', () => {
  it('PERMANENT WITHOUT ROLE grants SET on the proxy user only', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu1'], withoutRole: true, roles: [] });
    const [rule] = await rules(t);
    assert.equal(rule.kind, 'permanent');
    assert.equal(rule.proxy_user, 'pu1');
    assert.equal(rule.without_role, true);
    assert.deepEqual(rule.roles, []);
    assert.equal(rule.union_role, null);
    assert.equal(rule.status, 'granted');
    assert.equal(rule.granted_by, 'secadm');
    assert.deepEqual(await memberships(t), [{ role: 'pu1', grantor: 'secadm', ...SET_ONLY }]);
    assert.deepEqual(await settable(t, CANDIDATES), ['pu1']);
    // INHERIT FALSE: the trusted user's own connection gets nothing without a switch.
    await rejects(pg.query('SELECT * FROM tp', [], as(t)), '42501');
    await withClient(t, async (c) => {
      await c.query('SET ROLE pu1');
      await c.query('SELECT * FROM tp');
    });
  });

  it('PERMANENT WITH ROLE grants SET on the roles, not on the proxy user', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu2'], withoutRole: false, roles: ['r_a'] });
    const [rule] = await rules(t);
    assert.deepEqual([rule.kind, rule.without_role, rule.roles], ['permanent', false, ['r_a']]);
    assert.deepEqual(await memberships(t), [{ role: 'r_a', grantor: 'secadm', ...SET_ONLY }]);
    assert.deepEqual(await settable(t, CANDIDATES), ['r_a']);
  });

  it('application users WITH ROLE r_a, r_b get a union role with both privileges and nothing else', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web', 'api'], roles: ['r_b', 'r_a'] });
    const union = unionName(['r_a', 'r_b']);
    const rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.proxy_user, r.kind, r.roles, r.union_role]),
      [
        ['web', 'application', ['r_a', 'r_b'], union],
        ['api', 'application', ['r_a', 'r_b'], union],
      ],
    );
    assert.deepEqual(await memberships(t), [
      { role: 'r_a', grantor: 'secadm', ...SET_ONLY },
      { role: 'r_b', grantor: 'secadm', ...SET_ONLY },
      { role: union, grantor: pg.superuser, ...SET_ONLY },
    ]);
    assert.deepEqual(
      (await memberships(union)).map((m) => [m.role, m.inherit_option, m.set_option, m.admin_option]),
      [
        ['r_a', true, false, false],
        ['r_b', true, false, false],
      ],
    );
    assert.deepEqual(await settable(t, [...CANDIDATES, union]), ['r_a', 'r_b', union]);
    await withClient(t, async (c) => {
      await c.query(`SET ROLE ${union}`);
      await c.query('SELECT * FROM ta');
      await c.query('SELECT * FROM tb');
      await rejects(c.query('SELECT * FROM tc'), '42501');
      await rejects(c.query('SELECT * FROM tp'), '42501');
      await rejects(c.query('SET ROLE r_c'), '42501');
    });
  });

  it('adds roles to an active rule and supersedes it; the same grant again is a no-op', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_b'] });
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_b', 'r_a'] });
    const rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.roles, r.status, r.revoke_reason, r.revoked_by]),
      [
        [['r_a'], 'revoked', 'superseded', 'secadm'],
        [['r_a', 'r_b'], 'granted', null, null],
      ],
    );
    assert.deepEqual(await roleNames(t), ['r_a', 'r_b', unionName(['r_a', 'r_b'])]);
  });

  it('WITHOUT ROLE replaces a WITH ROLE rule and its memberships', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu1'], withoutRole: false, roles: ['r_a', 'r_b'] });
    assert.deepEqual(await roleNames(t), ['r_a', 'r_b', unionName(['r_a', 'r_b'])]);
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu1'], withoutRole: true, roles: [] });
    assert.deepEqual(await roleNames(t), ['pu1']);
    const [rule] = await active(t);
    assert.deepEqual([rule.without_role, rule.roles, rule.union_role], [true, [], null]);
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu1'], withoutRole: false, roles: ['r_c'] });
    assert.deepEqual(await roleNames(t), ['r_c']);
  });

  it('sync_memberships never gives a trusted user more than it may already SET, nor a foreign union role', async () => {
    const t = await trustedUser();
    // An admin writing the table directly skips the procedure's GRANTs (and PostgreSQL's checks).
    await pg.query(
      `INSERT INTO trustgate.connect_rule (trusted_user, proxy_user, kind, roles, union_role) VALUES ($1, 'web', 'application', '{r_a,r_c}', $2)`,
      [t, unionName(['r_a', 'r_c'])],
      as('secadm'),
    );
    await pg.query('SELECT trustgate.sync_memberships($1)', [t], as('secadm'));
    assert.deepEqual(await memberships(t), []);
    // A role squatting on a union role name is never handed out.
    const squat = unionName(['r_b', 'r_c']);
    await pg.query(`CREATE ROLE ${squat}; GRANT su_role TO ${squat}`);
    await rejects(
      call('secadm', { kind: 'grant-application', trustedUser: t, users: ['api'], roles: ['r_b', 'r_c'] }),
      '42710',
      new RegExp(`role "${squat}" already exists and is not a trustgate union role`),
    );
    assert.deepEqual(await memberships(t), []);
  });

  it('refuses callers that are not trustgate administrators', async () => {
    const t = await trustedUser();
    const err = await rejects(
      call('nonadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] }),
      '42501',
      /permission denied to grant or revoke CONNECT THROUGH/,
    );
    assert.match(err.hint ?? '', /trustgate_admin/);
    await rejects(call('nonadm', { kind: 'grant-trust-only', trustedUser: t }), '42501');
    assert.deepEqual(await rules(t), []);
  });

  it('lets PostgreSQL refuse a role or user without ADMIN option, and writes nothing', async () => {
    const t = await trustedUser();
    await rejects(
      call('secadm2', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a', 'r_c'] }),
      '42501',
      /r_c/,
    );
    await rejects(
      call('secadm2', { kind: 'grant-permanent', trustedUser: t, users: ['pu2'], withoutRole: true, roles: [] }),
      '42501',
      /pu2/,
    );
    assert.deepEqual(await rules(t), []);
    assert.deepEqual(await memberships(t), []);
  });

  it('refuses superusers as trusted user, proxy user or role', async () => {
    const t = await trustedUser();
    await rejects(
      call('secadm', { kind: 'grant-application', trustedUser: 'su_user', users: ['web'], roles: ['r_a'] }),
      '42501',
      /trusted user "su_user" is a superuser/,
    );
    await rejects(
      call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['su_user'], withoutRole: true, roles: [] }),
      '42501',
      /proxy user "su_user" is a superuser/,
    );
    await rejects(
      call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['su_role'] }),
      '42501',
      /role "su_role" is a superuser/,
    );
    assert.deepEqual(await memberships(t), []);
  });

  it('refuses unknown roles, application users named like roles, names of both kinds and self-proxies', async () => {
    const t = await trustedUser();
    await rejects(call('secadm', { kind: 'grant-trust-only', trustedUser: 'nobody' }), '42704', /role "nobody" does not exist/);
    await rejects(
      call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['nobody'], withoutRole: true, roles: [] }),
      '42704',
      /role "nobody" does not exist/,
    );
    await rejects(
      call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['nobody'] }),
      '42704',
      /role "nobody" does not exist/,
    );
    const err = await rejects(
      call('secadm', { kind: 'grant-application', trustedUser: t, users: ['pu1'], roles: ['r_a'] }),
      '42710',
      /application user "pu1" is the name of an existing role/,
    );
    assert.match(err.hint ?? '', /PERMANENT/);
    await rejects(
      call('secadm', { kind: 'grant-permanent', trustedUser: t, users: [t], withoutRole: true, roles: [] }),
      '22023',
      /cannot be a proxy user of itself/,
    );
    await rejects(call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: [] }), '22023');
    await rejects(call('secadm', { kind: 'drop-everything', trustedUser: t }), '22023');
    // An application user whose name later becomes a role cannot also be a PERMANENT proxy.
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['ghost'], roles: ['r_a'] });
    await pg.query('CREATE ROLE ghost; GRANT ghost TO secadm WITH ADMIN TRUE');
    await rejects(
      call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['ghost'], withoutRole: true, roles: [] }),
      '42710',
      /"ghost" is already an application proxy user of trusted user/,
    );
    assert.deepEqual((await active(t)).map((r) => [r.proxy_user, r.kind]), [['ghost', 'application']]);
  });

  it('keeps rules for audit: direct changes other than revocation are refused', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
    await rejects(
      pg.query(`UPDATE trustgate.connect_rule SET roles = '{r_a,r_c}' WHERE trusted_user = $1`, [t], as('secadm')),
      '42501',
      /can only be revoked/,
    );
    await rejects(pg.query('DELETE FROM trustgate.connect_rule WHERE trusted_user = $1', [t], as('secadm')), '42501');
    await rejects(
      pg.query(
        `INSERT INTO trustgate.connect_rule (trusted_user, proxy_user, kind, roles, union_role) VALUES ($1, 'x', 'application', '{r_a,r_b}', 'postgres')`,
        [t],
        as('secadm'),
      ),
      '23514',
    );
  });
});

describe('REVOKE CONNECT THROUGH', () => {
  it('by another admin than the granter removes the memberships and keeps the rule as revoked', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a', 'r_b'] });
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu1'], withoutRole: true, roles: [] });
    assert.equal((await memberships(t)).length, 4);
    await call('secadm2', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: [] });
    assert.deepEqual(await roleNames(t), ['pu1']);
    await call('secadm2', { kind: 'revoke-permanent', trustedUser: t, users: ['pu1'], roles: [] });
    assert.deepEqual(await memberships(t), []);
    const rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.proxy_user, r.status, r.granted_by, r.revoked_by, r.revoke_reason]),
      [
        ['web', 'revoked', 'secadm', 'secadm2', 'revoked'],
        ['pu1', 'revoked', 'secadm', 'secadm2', 'revoked'],
      ],
    );
    assert.ok(rows.every((r) => r.revoked_at instanceof Date));
    assert.deepEqual(await settable(t, CANDIDATES), []);
  });

  it('WITH ROLE removes only those roles, then the rule when none remain', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a', 'r_b'] });
    await call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
    let rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.roles, r.union_role, r.status, r.revoke_reason]),
      [
        [['r_a', 'r_b'], unionName(['r_a', 'r_b']), 'revoked', 'superseded'],
        [['r_b'], null, 'granted', null],
      ],
    );
    assert.deepEqual(await roleNames(t), ['r_b']);
    await rejects(
      call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: ['r_c'] }),
      '42704',
      /role "r_c" is not in the CONNECT THROUGH rule/,
    );
    await call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: ['r_b'] });
    rows = await rules(t);
    assert.deepEqual(rows.map((r) => r.status), ['revoked', 'revoked']);
    assert.equal(rows[1].revoke_reason, 'revoked');
    assert.deepEqual(await memberships(t), []);
  });

  it('keeps a membership another active rule still needs', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu2'], withoutRole: false, roles: ['r_a'] });
    await call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: [] });
    assert.deepEqual(await roleNames(t), ['r_a']);
    await call('secadm', { kind: 'revoke-permanent', trustedUser: t, users: ['pu2'], roles: [] });
    assert.deepEqual(await memberships(t), []);
  });

  it('needs ADMIN option on the roles named and on a PERMANENT user; a missing rule is 42704', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-permanent', trustedUser: t, users: ['pu2'], withoutRole: false, roles: ['r_a', 'r_c'] });
    await rejects(
      call('secadm2', { kind: 'revoke-permanent', trustedUser: t, users: ['pu2'], roles: [] }),
      '42501',
      /PERMANENT user "pu2"/,
    );
    await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a', 'r_c'] });
    await rejects(
      call('secadm2', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: ['r_c'] }),
      '42501',
      /role "r_c"/,
    );
    await rejects(call('nonadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: [] }), '42501');
    assert.equal((await active(t)).length, 2);
    await rejects(
      call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['nope'], roles: [] }),
      '42704',
      new RegExp(`no CONNECT THROUGH rule for proxy user "nope" through trusted user "${t}"`),
    );
    // The kind must match: web is an application user, not PERMANENT.
    await rejects(call('secadm', { kind: 'revoke-permanent', trustedUser: t, users: ['web'], roles: [] }), '42704');
  });
});

describe('TRUST ONLY', () => {
  it('is one row per trusted user, granted once and revoked once', async () => {
    const t = await trustedUser();
    await call('secadm', { kind: 'grant-trust-only', trustedUser: t });
    await call('secadm', { kind: 'grant-trust-only', trustedUser: t });
    let rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.kind, r.proxy_user, r.status]),
      [['trust_only', null, 'granted']],
    );
    await call('secadm2', { kind: 'revoke-trust-only', trustedUser: t });
    rows = await rules(t);
    assert.deepEqual(
      rows.map((r) => [r.kind, r.status, r.revoked_by]),
      [['trust_only', 'revoked', 'secadm2']],
    );
    await rejects(call('secadm', { kind: 'revoke-trust-only', trustedUser: t }), '42704', /TRUST ONLY/);
  });
});

describe('notifications', () => {
  it('announce rule changes and key rotation on trustgate_rules', async () => {
    const t = await trustedUser();
    await withClient(pg.superuser, async (listener) => {
      const payloads: string[] = [];
      let wake = () => {};
      listener.on('notification', (m) => {
        if (m.channel === 'trustgate_rules') payloads.push(m.payload ?? '');
        wake();
      });
      const arrived = (n: number) =>
        new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`notifications so far: ${payloads.join(',')}`)), 5000);
          wake = () => payloads.length >= n && (clearTimeout(timer), resolve());
          wake();
        });
      await listener.query('LISTEN trustgate_rules');
      await call('secadm', { kind: 'grant-application', trustedUser: t, users: ['web'], roles: ['r_a'] });
      await arrived(1);
      await call('secadm', { kind: 'revoke-application', trustedUser: t, users: ['web'], roles: [] });
      await arrived(2);
      await pg.query('SELECT trustgate.rotate_identity_key()', [], as('secadm'));
      await arrived(3);
      assert.deepEqual(payloads, [t, t, '*']);
    });
  });
});

describe('identity key and HMAC', () => {
  const gatewayKey = async () =>
    (await pg.query('SELECT trustgate.identity_key_for_gateway() AS k', [], as(AUTH_ROLE)))[0].k as Buffer;
  const hmacHex = (key: Buffer, msg: string | Buffer) => createHmac('sha256', key).update(msg).digest('hex');

  it('hmac_sha256 matches node:crypto for keys and messages of several lengths', async () => {
    for (const keyLen of [0, 1, 20, 32, 63, 64, 65, 100, 200]) {
      for (const msgLen of [0, 1, 55, 64, 1000]) {
        const key = Buffer.alloc(keyLen, 0).map((_, i) => (i * 7 + keyLen) & 0xff);
        const msg = Buffer.alloc(msgLen, 0).map((_, i) => (i * 13 + 5) & 0xff);
        const [row] = await pg.query('SELECT encode(trustgate.hmac_sha256($1, $2), \'hex\') AS h', [key, msg]);
        assert.equal(row.h, hmacHex(Buffer.from(key), Buffer.from(msg)), `key ${keyLen} msg ${msgLen}`);
      }
    }
  });

  it('gives the key to the auth role only; trust_key to admins only', async () => {
    const key = await gatewayKey();
    assert.equal(key.length, 32);
    await rejects(pg.query('SELECT trustgate.identity_key_for_gateway()', [], as('secadm')), '42501');
    const [row] = await pg.query(`SELECT trustgate.trust_key('app_tier') AS k`, [], as('secadm'));
    assert.equal(row.k, hmacHex(key, 'trusted-request:app_tier'));
    await rejects(pg.query(`SELECT trustgate.trust_key('app_tier')`, [], as('nonadm')), '42501');
    await rejects(pg.query(`SELECT trustgate.rotate_identity_key()`, [], as('nonadm')), '42501');
  });

  it('identity() accepts only a token MACed with the key for this backend and session user', async () => {
    const t = await trustedUser();
    await withClient(t, async (c) => {
      const q = async (sql: string) => (await c.query(sql)).rows[0];
      const set = (json: string, mac: string) =>
        c.query(`SELECT set_config('trustgate.identity', $1, false), set_config('trustgate.identity_mac', $2, false)`, [json, mac]);
      assert.deepEqual(await q('SELECT trustgate.identity() AS i, trustgate.proxy_user() AS pu, trustgate.trusted_user() AS tu'), {
        i: null,
        pu: null,
        tu: null,
      });
      const pid = (await q('SELECT pg_backend_pid() AS pid')).pid as number;
      const key = await gatewayKey();
      const token = (o: Record<string, unknown>) => {
        const json = JSON.stringify(o);
        return [json, hmacHex(key, Buffer.from(json, 'utf8'))] as const;
      };
      const id = {
        v: 1,
        pid,
        tu: t,
        pu: 'alice',
        pr: 'ALL',
        k: 'permanent',
        // The role the session runs as (no SET ROLE here): identity() checks it.
        role: t,
        qb: 'ProxyUser=alice;order=42;Zone=é ü;',
        tb: 'ProxyUser=alice;',
        sb: 'order=42;Zone=é ü;',
      };
      await set(...token(id));
      const got = await q(`SELECT trustgate.identity() AS i, trustgate.trusted_user() AS tu, trustgate.proxy_user() AS pu,
        trustgate.proxy_role() AS pr, trustgate.proxy_kind() AS k, trustgate.query_band() AS qb,
        trustgate.query_band('transaction') AS tb, trustgate.query_band('SESSION') AS sb,
        trustgate.query_band_value('ORDER') AS ord, trustgate.query_band_value('zone') AS zone,
        trustgate.query_band_value('missing') AS missing`);
      assert.deepEqual(got, {
        i: id,
        tu: t,
        pu: 'alice',
        pr: 'ALL',
        k: 'permanent',
        qb: id.qb,
        tb: id.tb,
        sb: id.sb,
        ord: '42',
        zone: 'é ü',
        missing: null,
      });
      await rejects(c.query(`SELECT trustgate.query_band('profile')`), '22023');
      // A token issued for another role than the session runs as is refused.
      await set(...token({ ...id, role: 'alice' }));
      await rejects(c.query('SELECT trustgate.proxy_user()'), '42501');
      await set(...token(id));

      // No proxy user in force: trusted_user() is NULL.
      await set(...token({ ...id, pu: null, pr: null, k: null, tb: null }));
      assert.deepEqual(await q('SELECT trustgate.trusted_user() AS tu, trustgate.proxy_user() AS pu'), { tu: null, pu: null });

      const forged = 'trustgate identity settings were not set by trustgate';
      const [json, mac] = token(id);
      await set(json, mac.replace(/^./, (ch) => (ch === '0' ? '1' : '0')));
      await rejects(c.query('SELECT trustgate.identity()'), '42501', new RegExp(forged));
      await set(json.replace('alice', 'bobby'), mac);
      await rejects(c.query('SELECT trustgate.proxy_user()'), '42501', new RegExp(forged));
      await set(json, '');
      await rejects(c.query('SELECT trustgate.identity()'), '42501', new RegExp(forged));
      await set(...token({ ...id, pid: pid + 1 }));
      await rejects(c.query('SELECT trustgate.identity()'), '42501', new RegExp(forged));
      await set(...token({ ...id, tu: 'pu1' }));
      await rejects(c.query('SELECT trustgate.query_band()'), '42501', new RegExp(forged));

      // A rotated key invalidates tokens made with the old one.
      await set(...token(id));
      assert.equal((await q('SELECT trustgate.proxy_user() AS pu')).pu, 'alice');
      await pg.query('SELECT trustgate.rotate_identity_key()', [], as('secadm'));
      await rejects(c.query('SELECT trustgate.identity()'), '42501', new RegExp(forged));
      const newKey = await gatewayKey();
      assert.notDeepEqual(newKey, key);
      const json2 = JSON.stringify(id);
      await set(json2, hmacHex(newKey, json2));
      assert.equal((await q('SELECT trustgate.proxy_user() AS pu')).pu, 'alice');

      await set('', '');
      assert.equal((await q('SELECT trustgate.identity() AS i')).i, null);
    });
  });

  it('query_band_value(band, name) reads a logged band', async () => {
    const [row] = await pg.query(
      `SELECT trustgate.query_band_value(' a = 1 ; ProxyUser=alice;b=x y;', 'proxyuser') AS pu,
              trustgate.query_band_value('a=1;b=x y;', 'B') AS b,
              trustgate.query_band_value('a=1;b=2;', 'c') AS c,
              trustgate.query_band_value(NULL, 'a') AS n,
              trustgate.query_band_value('a=1;a=2;', 'a') AS first`,
      [],
      as('nonadm'),
    );
    assert.deepEqual(row, { pu: 'alice', b: 'x y', c: null, n: null, first: '1' });
  });

  it('assert_proxy_role returns the role only when the proxy user may SET it', async () => {
    const [row] = await pg.query(`SELECT trustgate.assert_proxy_role('pu2', 'r_c') AS r`, [], as('nonadm'));
    assert.equal(row.r, 'r_c');
    await rejects(
      pg.query(`SELECT trustgate.assert_proxy_role('pu1', 'r_c')`, [], as('nonadm')),
      '42501',
      /proxy user "pu1" is not a member of role "r_c"/,
    );
  });
});
