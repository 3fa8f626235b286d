import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  ConnectThroughError,
  MAX_PROXY_USERS_PER_STATEMENT,
  isConnectThroughStatement,
  parseConnectThrough,
} from '../../src/trust/connect-through.js';

function fails(sql: string, token: string, message?: RegExp): void {
  assert.throws(
    () => parseConnectThrough(sql),
    (err: unknown) => {
      assert.ok(err instanceof ConnectThroughError, `expected ConnectThroughError, got ${String(err)}`);
      assert.equal(err.sqlState, '42601');
      assert.equal(err.token, token, err.message);
      if (token !== '') assert.ok(err.message.includes(`"${token}"`), err.message);
      if (message) assert.match(err.message, message);
      return true;
    },
    sql,
  );
}

describe('isConnectThroughStatement', () => {
  it('recognises GRANT/REVOKE CONNECT THROUGH after comments, any case', () => {
    assert.equal(isConnectThroughStatement('GRANT CONNECT THROUGH app TO PERMANENT u WITHOUT ROLE'), true);
    assert.equal(isConnectThroughStatement('  revoke\n connect\tthrough app with trust_only'), true);
    assert.equal(isConnectThroughStatement('-- x\n/* y */ Grant Connect Through a'), true);
  });
  it('rejects other GRANT/REVOKE statements', () => {
    assert.equal(isConnectThroughStatement('GRANT CONNECT ON DATABASE d TO u'), false);
    assert.equal(isConnectThroughStatement('GRANT CONNECT THROUGHOUT x'), false);
    assert.equal(isConnectThroughStatement('SELECT 1 -- GRANT CONNECT THROUGH'), false);
    assert.equal(isConnectThroughStatement('/* open GRANT CONNECT THROUGH'), false);
  });
});

describe('GRANT CONNECT THROUGH', () => {
  it('TO PERMANENT … WITHOUT ROLE', () => {
    assert.deepEqual(parseConnectThrough('GRANT CONNECT THROUGH app_tier TO PERMANENT alice WITHOUT ROLE;'), {
      kind: 'grant-permanent',
      trustedUser: 'app_tier',
      users: ['alice'],
      withoutRole: true,
      roles: [],
    });
  });
  it('TO PERMANENT list WITH ROLE list', () => {
    assert.deepEqual(parseConnectThrough('GRANT CONNECT THROUGH app TO PERMANENT alice, bob WITH ROLE r1, r2'), {
      kind: 'grant-permanent',
      trustedUser: 'app',
      users: ['alice', 'bob'],
      withoutRole: false,
      roles: ['r1', 'r2'],
    });
  });
  it('TO application users WITH ROLE', () => {
    assert.deepEqual(parseConnectThrough('GRANT CONNECT THROUGH app TO web_user1,web_user2 WITH ROLE shop_reader'), {
      kind: 'grant-application',
      trustedUser: 'app',
      users: ['web_user1', 'web_user2'],
      roles: ['shop_reader'],
    });
  });
  it('WITH TRUST_ONLY and WITH TRUST ONLY', () => {
    const expected = { kind: 'grant-trust-only', trustedUser: 'app' };
    assert.deepEqual(parseConnectThrough('GRANT CONNECT THROUGH app WITH TRUST_ONLY;'), expected);
    assert.deepEqual(parseConnectThrough('grant connect through app with trust only'), expected);
  });
  it('case, whitespace, comments and the trailing semicolon are free', () => {
    const forms = [
      'grant connect through APP to permanent Alice without role',
      'GrAnT\n\tCONNECT   through App TO\nPERMANENT ALICE  WITHOUT\nROLE ;  ',
      '-- who may act for alice\n/* rule */ GRANT CONNECT THROUGH app TO PERMANENT alice WITHOUT ROLE; -- done',
      'GRANT CONNECT /* a /* nested */ b */ THROUGH app TO PERMANENT alice -- eol\n WITHOUT ROLE',
    ];
    for (const sql of forms) {
      assert.deepEqual(parseConnectThrough(sql), {
        kind: 'grant-permanent',
        trustedUser: 'app',
        users: ['alice'],
        withoutRole: true,
        roles: [],
      }, sql);
    }
  });
  it('quoted identifiers keep case, spaces, keywords and "" escapes', () => {
    assert.deepEqual(parseConnectThrough('GRANT CONNECT THROUGH "App Tier" TO "Web User", "with", "a""b" WITH ROLE "Read-Only", "PERMANENT"'), {
      kind: 'grant-application',
      trustedUser: 'App Tier',
      users: ['Web User', 'with', 'a"b'],
      roles: ['Read-Only', 'PERMANENT'],
    });
  });
  it('unquoted identifiers: non-ASCII letters and $ are allowed, only ASCII is lower-cased', () => {
    const r = parseConnectThrough('GRANT CONNECT THROUGH ÜberApp$1 TO PERMANENT Zoë WITHOUT ROLE');
    assert.equal(r.trustedUser, 'Überapp$1');
    assert.deepEqual((r as { users: readonly string[] }).users, ['zoë']);
  });
  it('identifiers may be 63 bytes, not 64', () => {
    const r = parseConnectThrough(`GRANT CONNECT THROUGH ${'a'.repeat(63)} WITH TRUST_ONLY`);
    assert.equal(r.trustedUser, 'a'.repeat(63));
    fails(`GRANT CONNECT THROUGH ${'a'.repeat(64)} WITH TRUST_ONLY`, 'a'.repeat(64), /longer than 63 bytes/);
    fails(`GRANT CONNECT THROUGH app TO "${'é'.repeat(32)}" WITH ROLE r`, `"${'é'.repeat(32)}"`, /longer than 63 bytes/);
  });
  it(`at most ${MAX_PROXY_USERS_PER_STATEMENT} proxy users per statement`, () => {
    const names = (n: number) => Array.from({ length: n }, (_, i) => `u${i}`).join(', ');
    const ok = parseConnectThrough(`GRANT CONNECT THROUGH app TO ${names(25)} WITH ROLE r`);
    assert.equal((ok as { users: readonly string[] }).users.length, 25);
    fails(`GRANT CONNECT THROUGH app TO ${names(26)} WITH ROLE r`, 'u25', /at most 25/);
  });
  it('missing WITH ROLE for application users is an error', () => {
    fails('GRANT CONNECT THROUGH app TO web_user', '', /end of input.*WITH ROLE/);
    fails('GRANT CONNECT THROUGH app TO web_user;', ';', /WITH ROLE/);
  });
  it('WITHOUT ROLE with an application user is an error', () => {
    fails('GRANT CONNECT THROUGH app TO web_user WITHOUT ROLE', 'WITHOUT', /WITH ROLE/);
  });
  it('missing role clause for permanent users is an error', () => {
    fails('GRANT CONNECT THROUGH app TO PERMANENT alice', '', /WITH ROLE or WITHOUT ROLE/);
  });
  it('WITH ROLE needs at least one role, lists need names between commas', () => {
    fails('GRANT CONNECT THROUGH app TO u WITH ROLE', '', /role name/);
    fails('GRANT CONNECT THROUGH app TO u WITH ROLE r,', '', /role name/);
    fails('GRANT CONNECT THROUGH app TO u, , v WITH ROLE r', ',', /application user name/);
    fails('GRANT CONNECT THROUGH app TO PERMANENT WITH ROLE r', 'WITH', /permanent user name/);
  });
  it('repeated names in a list are an error', () => {
    fails('GRANT CONNECT THROUGH app TO u, U WITH ROLE r', 'U', /listed twice/);
    fails('GRANT CONNECT THROUGH app TO u WITH ROLE r, "r"', '"r"', /listed twice/);
  });
  it('WITH PROFILE is not supported', () => {
    fails('GRANT CONNECT THROUGH app TO u WITH PROFILE p', 'PROFILE', /no profiles/);
  });
  it('TRUST_ONLY cannot be combined with TO', () => {
    fails('GRANT CONNECT THROUGH app WITH TRUST_ONLY TO u WITH ROLE r', 'TO', /cannot be combined/);
    fails('GRANT CONNECT THROUGH app WITH TRUST', '', /ONLY/);
    fails('GRANT CONNECT THROUGH app WITH ROLE r', 'ROLE', /TRUST_ONLY/);
  });
  it('garbage after the statement is an error', () => {
    fails('GRANT CONNECT THROUGH app TO PERMANENT u WITHOUT ROLE garbage', 'garbage', /end of statement/);
    fails('GRANT CONNECT THROUGH app TO PERMANENT u WITHOUT ROLE; DROP TABLE x', 'DROP', /end of statement/);
    fails('GRANT CONNECT THROUGH app TO u WITH ROLE r;;', ';', /end of statement/);
    fails('GRANT CONNECT THROUGH app WITH TRUST_ONLY, x', ',', /end of statement/);
    fails("GRANT CONNECT THROUGH app TO u WITH ROLE r' OR 1=1", "'", /end of statement/);
    fails('GRANT CONNECT THROUGH app TO u WITH ROLE 1r', '1r', /role name/);
  });
  it('other syntax errors name the token', () => {
    fails('GRANT CONNECT app TO u WITH ROLE r', 'app', /expected THROUGH/);
    fails('GRANT CONNECT THROUGH TO u WITH ROLE r', 'TO', /trusted user name/);
    fails('GRANT CONNECT THROUGH app FROM u WITH ROLE r', 'FROM', /expected TO/);
    fails('SELECT 1', 'SELECT', /GRANT or REVOKE/);
    fails('', '', /end of input/);
    fails('GRANT CONNECT THROUGH "unterminated TO u', '"unterminated TO u', /unterminated quoted identifier/);
    fails('GRANT CONNECT THROUGH "" WITH TRUST_ONLY', '""', /zero-length/);
  });
  it('reports the 1-based position of the failing token', () => {
    assert.throws(
      () => parseConnectThrough('GRANT CONNECT THROUGH app TO u WITHOUT ROLE'),
      (err: unknown) => err instanceof ConnectThroughError && err.position === 32,
    );
  });
});

describe('REVOKE CONNECT THROUGH', () => {
  it('FROM PERMANENT list (whole rule)', () => {
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app FROM PERMANENT alice, bob;'), {
      kind: 'revoke-permanent',
      trustedUser: 'app',
      users: ['alice', 'bob'],
      roles: [],
    });
  });
  it('TO is accepted like FROM (Teradata: { TO | FROM })', () => {
    assert.deepEqual(parseConnectThrough('revoke connect through app to permanent alice'), parseConnectThrough('REVOKE CONNECT THROUGH app FROM PERMANENT alice'));
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app TO web_user'), parseConnectThrough('REVOKE CONNECT THROUGH app FROM web_user'));
  });
  it('FROM application users, optionally only some roles', () => {
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app FROM w1, "W 2"'), {
      kind: 'revoke-application',
      trustedUser: 'app',
      users: ['w1', 'W 2'],
      roles: [],
    });
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app FROM w1 WITH ROLE r1, r2'), {
      kind: 'revoke-application',
      trustedUser: 'app',
      users: ['w1'],
      roles: ['r1', 'r2'],
    });
  });
  it('FROM PERMANENT … WITH ROLE removes only those roles', () => {
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app FROM PERMANENT alice WITH ROLE r1'), {
      kind: 'revoke-permanent',
      trustedUser: 'app',
      users: ['alice'],
      roles: ['r1'],
    });
  });
  it('WITH TRUST_ONLY / TRUST ONLY', () => {
    const expected = { kind: 'revoke-trust-only', trustedUser: 'app' };
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app WITH TRUST_ONLY'), expected);
    assert.deepEqual(parseConnectThrough('REVOKE CONNECT THROUGH app WITH TRUST ONLY;'), expected);
  });
  it('errors', () => {
    fails('REVOKE CONNECT THROUGH app alice', 'alice', /TO, FROM or WITH TRUST_ONLY/);
    fails('REVOKE CONNECT THROUGH app FROM PERMANENT alice WITHOUT ROLE', 'WITHOUT', /end of statement/);
    fails('REVOKE CONNECT THROUGH app FROM alice WITH', '', /ROLE/);
    fails('REVOKE CONNECT THROUGH app FROM alice; GRANT CONNECT THROUGH app WITH TRUST_ONLY', 'GRANT', /end of statement/);
    fails('REVOKE CONNECT THROUGH app WITH TRUST_ONLY FROM alice', 'FROM', /cannot be combined/);
  });
});
