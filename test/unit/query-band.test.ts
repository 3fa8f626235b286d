import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  QUERY_BAND_LIMITS,
  QueryBandError,
  effectiveBand,
  isQueryBandStatement,
  mergeBand,
  parseBand,
  parseSetQueryBand,
} from '../../src/trust/query-band.js';

function throwsState(fn: () => unknown, sqlState: string, message?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof QueryBandError, `expected QueryBandError, got ${String(err)}`);
    assert.equal(err.sqlState, sqlState, err.message);
    if (message) assert.match(err.message, message);
    return true;
  });
}

const band = (text: string): string => String(parseBand(text));

describe('isQueryBandStatement', () => {
  it('recognises the statement with case, whitespace and leading comments', () => {
    assert.equal(isQueryBandStatement("SET QUERY_BAND = 'a=1;' FOR SESSION"), true);
    assert.equal(isQueryBandStatement("  \n\tset\n  query_band='a=1;' for session"), true);
    assert.equal(isQueryBandStatement("-- note\n/* a /* nested */ b */ SeT Query_Band = NONE FOR SESSION"), true);
  });
  it('rejects other statements and near misses', () => {
    assert.equal(isQueryBandStatement('SET search_path = x'), false);
    assert.equal(isQueryBandStatement('SET QUERY_BANDS = 1'), false);
    assert.equal(isQueryBandStatement("SELECT 'SET QUERY_BAND'"), false);
    assert.equal(isQueryBandStatement('/* unterminated SET QUERY_BAND'), false);
    assert.equal(isQueryBandStatement(''), false);
  });
});

describe('parseSetQueryBand: statement forms', () => {
  it('FOR SESSION', () => {
    const r = parseSetQueryBand("SET QUERY_BAND = 'a=1;b=2;' FOR SESSION;");
    assert.deepEqual({ ...r, band: String(r.band) }, { scope: 'session', volatile: false, update: false, band: 'a=1;b=2;' });
  });
  it('UPDATE FOR SESSION', () => {
    const r = parseSetQueryBand("SET QUERY_BAND = 'a=1;' UPDATE FOR SESSION");
    assert.equal(r.update, true);
    assert.equal(r.scope, 'session');
  });
  it('FOR SESSION VOLATILE and UPDATE FOR SESSION VOLATILE', () => {
    const r = parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION VOLATILE");
    assert.deepEqual([r.scope, r.volatile, r.update], ['session', true, false]);
    const u = parseSetQueryBand("SET QUERY_BAND = 'a=1;' UPDATE FOR SESSION VOLATILE;");
    assert.deepEqual([u.scope, u.volatile, u.update], ['session', true, true]);
  });
  it('FOR TRANSACTION and UPDATE FOR TRANSACTION', () => {
    const r = parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR TRANSACTION");
    assert.deepEqual([r.scope, r.volatile, r.update], ['transaction', false, false]);
    assert.equal(parseSetQueryBand("SET QUERY_BAND = 'a=1;' UPDATE FOR TRANSACTION").update, true);
  });
  it('NONE FOR SESSION / FOR TRANSACTION', () => {
    assert.deepEqual(parseSetQueryBand('SET QUERY_BAND = NONE FOR SESSION;'), {
      scope: 'session',
      volatile: false,
      update: false,
      band: null,
    });
    assert.equal(parseSetQueryBand('set query_band = none for transaction').band, null);
  });
  it("the empty literal '' (and whitespace only) means NONE", () => {
    assert.equal(parseSetQueryBand("SET QUERY_BAND = '' FOR SESSION").band, null);
    assert.equal(parseSetQueryBand("SET QUERY_BAND = '   ' FOR TRANSACTION").band, null);
  });
  it('case, whitespace, comments and the trailing semicolon are free', () => {
    const forms = [
      "set query_band='a=1;' for session",
      "SeT   QuErY_bAnD\n=\t'a=1;'\n\nFoR    SeSsIoN   ;  ",
      "-- leading comment\n/* block */ SET QUERY_BAND = 'a=1;' FOR SESSION; -- trailing comment",
      "SET /* in between */ QUERY_BAND = 'a=1;' /* here */ FOR -- eol\n SESSION",
    ];
    for (const sql of forms) assert.equal(String(parseSetQueryBand(sql).band), 'a=1;', sql);
  });
  it("'' inside the literal is an apostrophe; backslash is literal", () => {
    assert.equal(parseSetQueryBand("SET QUERY_BAND = 'name=O''Brien;p=C:\\x;' FOR SESSION").band?.get('name'), "O'Brien");
    assert.equal(parseSetQueryBand("SET QUERY_BAND = 'name=O''Brien;p=C:\\x;' FOR SESSION").band?.get('p'), 'C:\\x');
  });
});

describe('parseSetQueryBand: errors', () => {
  it('statement syntax errors are 42601 and name the problem', () => {
    throwsState(() => parseSetQueryBand("SET QUERY_BAND 'a=1;' FOR SESSION"), '42601', /"a=1;'|expected "="/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;'"), '42601', /at end of input.*expected FOR/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR"), '42601', /SESSION or TRANSACTION/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR EVER"), '42601', /"EVER"/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION UPDATE"), '42601', /"UPDATE"/);
    throwsState(() => parseSetQueryBand('SET QUERY_BAND = a FOR SESSION'), '42601', /"a"/);
    throwsState(() => parseSetQueryBand('SET QUERY_BAND = ? FOR TRANSACTION'), '42601', /"\?"/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1; FOR SESSION"), '42601', /unterminated string/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION /* open"), '42601', /unterminated/);
    throwsState(() => parseSetQueryBand("SET search_path = 'a=1;' FOR SESSION"), '42601', /QUERY_BAND/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION;;"), '42601', /end of statement/);
  });
  it('garbage or a second statement after the statement is 42601', () => {
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION; SELECT 1"), '42601', /"SELECT"/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION x"), '42601', /"x"/);
  });
  it('unsupported combinations are 0A000', () => {
    throwsState(() => parseSetQueryBand('SET QUERY_BAND = NONE UPDATE FOR SESSION'), '0A000', /UPDATE.*NONE/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = '' UPDATE FOR SESSION"), '0A000', /UPDATE.*empty/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR TRANSACTION VOLATILE"), '0A000', /VOLATILE.*TRANSACTION/);
    throwsState(() => parseSetQueryBand('SET QUERY_BAND = NONE FOR SESSION VOLATILE'), '0A000', /VOLATILE.*NONE/);
  });
  it('a malformed band inside a valid statement is 22023', () => {
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1' FOR SESSION"), '22023', /not terminated by ';'/);
  });
});

describe('injection-like inputs never end the statement', () => {
  it("an escaped '' keeps the rest inside the literal, where it is a malformed band", () => {
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=x''; DROP TABLE x; --;' FOR SESSION;"), '22023', /DROP TABLE x/);
  });
  it('a quote that closes the literal early leaves garbage: syntax error', () => {
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1'; DROP TABLE x; --' FOR SESSION"), '42601', /";".*expected FOR/);
    throwsState(() => parseSetQueryBand("SET QUERY_BAND = 'a=1;' FOR SESSION; DROP TABLE x; --"), '42601', /"DROP"/);
  });
  it('a value that only looks like SQL stays inside the value', () => {
    const r = parseSetQueryBand("SET QUERY_BAND = 'note=x'' OR 1 -- /* ;' FOR SESSION");
    assert.equal(r.band?.get('note'), "x' OR 1 -- /*");
    assert.deepEqual(r.band?.pairs, [['note', "x' OR 1 -- /*"]]);
  });
  it('comment markers inside the literal are not comments', () => {
    assert.equal(parseSetQueryBand("SET QUERY_BAND = 'a=--x;b=/*y;' FOR SESSION").band?.get('b'), '/*y');
  });
});

describe('parseBand: pairs and canonical form', () => {
  it('parses pairs, strips pads and prints the canonical text', () => {
    const b = parseBand('  job = nightly load ;App=web;  ');
    assert.deepEqual(b.pairs, [
      ['job', 'nightly load'],
      ['App', 'web'],
    ]);
    assert.equal(b.toString(), 'job=nightly load;App=web;');
    assert.equal(`${b}`, 'job=nightly load;App=web;');
  });
  it('get is case-insensitive', () => {
    const b = parseBand('AppName=web;');
    assert.equal(b.get('appname'), 'web');
    assert.equal(b.get('APPNAME'), 'web');
    assert.equal(b.get('other'), undefined);
  });
  it('allows letters, digits and underscore in names; keeps unicode in values', () => {
    assert.equal(band('a_1=x;_=y;9=z;v=ünïcødé €;'), 'a_1=x;_=y;9=z;v=ünïcødé €;');
  });
  it('is immutable', () => {
    const b = parseBand('a=1;');
    assert.throws(() => (b.pairs as unknown as unknown[]).push(['b', '2']));
  });
  it('rejects a missing final ;', () => throwsState(() => parseBand('a=1;b=2'), '22023', /"b=2" is not terminated by ';'/));
  it('rejects an empty pair', () => throwsState(() => parseBand('a=1;;'), '22023', /empty pair/));
  it('rejects a pair without =', () => throwsState(() => parseBand('a;'), '22023', /"a" has no '='/));
  it('rejects an empty name', () => throwsState(() => parseBand('=1;'), '22023', /empty name/));
  it('rejects an empty value', () => {
    throwsState(() => parseBand('a=;'), '22023', /"a" has an empty value/);
    throwsState(() => parseBand('a=   ;'), '22023', /empty value/);
  });
  it("rejects '=' inside a value", () => throwsState(() => parseBand('a=b=c;'), '22023', /"a" contains '='/));
  it('rejects bad characters in names', () => {
    for (const name of ['a b', 'a-b', 'a.b', 'é', 'a"b', "a'b"]) {
      throwsState(() => parseBand(`${name}=1;`), '22023', /letters, digits and '_'/);
    }
  });
  it('rejects control characters in values', () => {
    throwsState(() => parseBand('a=x\u0000y;'), '22023', /control character/);
    throwsState(() => parseBand('a=x\ny;'), '22023', /control character/);
  });
  it('rejects repeated names, also differing only in case', () => {
    throwsState(() => parseBand('a=1;a=2;'), '22023', /"a" appears more than once/);
    throwsState(() => parseBand('Job=1;JOB=2;'), '22023', /"JOB" appears more than once/);
    throwsState(() => parseBand('ProxyUser=a;PROXYUSER=b;'), '22023', /more than once/);
  });
  it('rejects an empty band', () => throwsState(() => parseBand('  '), '22023', /empty/));
});

describe('parseBand: limits (exactly at and one over)', () => {
  const { name: N, value: V, band: B } = QUERY_BAND_LIMITS;
  it('has the documented limits', () => assert.deepEqual({ ...QUERY_BAND_LIMITS }, { name: 128, value: 256, band: 4096 }));
  it(`name of ${N} characters is accepted, ${N + 1} is not`, () => {
    assert.equal(parseBand(`${'n'.repeat(N)}=1;`).pairs[0][0].length, N);
    throwsState(() => parseBand(`${'n'.repeat(N + 1)}=1;`), '22023', /129 characters long; the limit is 128/);
  });
  it(`value of ${V} characters is accepted, ${V + 1} is not`, () => {
    assert.equal(parseBand(`a=${'v'.repeat(V)};`).get('a')?.length, V);
    throwsState(() => parseBand(`a=${'v'.repeat(V + 1)};`), '22023', /257 characters long; the limit is 256/);
  });
  it('value length counts characters (code points), not UTF-16 units or bytes', () => {
    assert.equal([...parseBand(`a=${'😀'.repeat(V)};`).get('a')!].length, V);
    throwsState(() => parseBand(`a=${'😀'.repeat(V + 1)};`), '22023', /limit is 256/);
  });
  /** A band of exactly `length` characters made of valid pairs. */
  function bandOfLength(length: number): string {
    let text = '';
    for (let i = 0; text.length + 262 < length; i++) text += `n${String(i).padStart(3, '0')}=${'v'.repeat(256)};`;
    const rest = length - text.length; // "z=" + value + ";" → value of rest - 3
    return text + `z=${'v'.repeat(rest - 3)};`;
  }
  it(`whole band of ${B} characters is accepted, ${B + 1} is not`, () => {
    const atLimit = bandOfLength(B);
    assert.equal(atLimit.length, B);
    assert.equal(parseBand(atLimit).toString(), atLimit);
    const over = bandOfLength(B + 1);
    assert.equal(over.length, B + 1);
    throwsState(() => parseBand(over), '22023', /4097 characters long; the limit is 4096/);
  });
  it('the band limit counts the literal as written, padding included', () => {
    throwsState(() => parseBand(`a=1;${' '.repeat(B - 3)}`), '22023', /limit is 4096/);
    assert.equal(band(`a=1;${' '.repeat(B - 4)}`), 'a=1;');
  });
});

describe('reserved names ProxyUser and ProxyRole', () => {
  it('match case-insensitively and take canonical casing', () => {
    const b = parseBand('PROXYUSER=cluser1;proxyrole=role1;other=x;');
    assert.deepEqual(b.pairs, [
      ['ProxyUser', 'cluser1'],
      ['ProxyRole', 'role1'],
      ['other', 'x'],
    ]);
    assert.equal(b.toString(), 'ProxyUser=cluser1;ProxyRole=role1;other=x;');
    assert.equal(b.proxyUser, 'cluser1');
    assert.deepEqual(b.proxyRole, { kind: 'role', name: 'role1' });
  });
  it('ProxyRole ALL / NONE are case-insensitive keywords', () => {
    assert.deepEqual(parseBand('ProxyRole=ALL;').proxyRole, { kind: 'all' });
    assert.deepEqual(parseBand('ProxyRole=all;').proxyRole, { kind: 'all' });
    assert.deepEqual(parseBand('ProxyRole=None;').proxyRole, { kind: 'none' });
    assert.deepEqual(parseBand('ProxyRole=NONE;').proxyRole, { kind: 'none' });
  });
  it('ProxyRole name: unquoted lower-cased, quoted kept (also "ALL" as a name)', () => {
    assert.deepEqual(parseBand('ProxyRole=Sales_Role;').proxyRole, { kind: 'role', name: 'sales_role' });
    assert.deepEqual(parseBand('ProxyRole="Sales Role";').proxyRole, { kind: 'role', name: 'Sales Role' });
    assert.deepEqual(parseBand('ProxyRole="ALL";').proxyRole, { kind: 'role', name: 'ALL' });
    assert.deepEqual(parseBand('ProxyRole="a""b";').proxyRole, { kind: 'role', name: 'a"b' });
  });
  it('ProxyUser is a role name: unquoted lower-cased, quoted kept; pairs keep the text as written', () => {
    const b = parseBand('ProxyUser=Alice;');
    assert.equal(b.proxyUser, 'alice');
    assert.equal(b.get('proxyuser'), 'Alice');
    assert.equal(parseBand('ProxyUser="Alice";').proxyUser, 'Alice');
    assert.equal(parseBand('ProxyUser=user$1;').proxyUser, 'user$1');
  });
  it('rejects values that are not role names', () => {
    for (const v of ['a b', '1abc', '"unterminated', '""', 'a"b', 'x-y', `${'r'.repeat(64)}`]) {
      throwsState(() => parseBand(`ProxyUser=${v};`), '22023', /ProxyUser value .* not a valid role name/);
      throwsState(() => parseBand(`ProxyRole=${v};`), '22023', /ProxyRole value .* not a valid role name, ALL or NONE/);
    }
  });
  it('role names may be 63 bytes, not 64', () => {
    assert.equal(parseBand(`ProxyUser=${'r'.repeat(63)};`).proxyUser, 'r'.repeat(63));
    assert.equal(parseBand(`ProxyUser="${'é'.repeat(31)}x";`).proxyUser?.length, 32); // 63 bytes
    throwsState(() => parseBand(`ProxyUser="${'é'.repeat(32)}";`), '22023', /not a valid role name/); // 64 bytes
  });
  it('bands without them have no proxy fields', () => {
    const b = parseBand('a=1;');
    assert.equal(b.proxyUser, undefined);
    assert.equal(b.proxyRole, undefined);
    assert.equal('proxyUser' in b, false);
  });
});

describe('mergeBand (UPDATE)', () => {
  it('replaces same-named pairs in place and appends new names', () => {
    const merged = mergeBand(parseBand('a=1;B=2;c=3;'), parseBand('b=20;d=4;'));
    assert.equal(merged.toString(), 'a=1;B=20;c=3;d=4;');
    assert.equal(merged.get('b'), '20');
  });
  it('with no session band returns the update', () => {
    assert.equal(mergeBand(null, parseBand('a=1;')).toString(), 'a=1;');
  });
  it('recomputes the proxy fields', () => {
    const merged = mergeBand(parseBand('ProxyUser=u1;ProxyRole=r1;'), parseBand('proxyrole=ALL;'));
    assert.equal(merged.toString(), 'ProxyUser=u1;ProxyRole=ALL;');
    assert.equal(merged.proxyUser, 'u1');
    assert.deepEqual(merged.proxyRole, { kind: 'all' });
  });
  it('does not change its inputs', () => {
    const session = parseBand('a=1;');
    mergeBand(session, parseBand('a=2;'));
    assert.equal(session.toString(), 'a=1;');
  });
  it('the merged band must stay within the 4096-character limit', () => {
    const big = (prefix: string, n: number) =>
      parseBand(Array.from({ length: n }, (_, i) => `${prefix}${String(i).padStart(3, '0')}=${'v'.repeat(256)};`).join(''));
    // each pair is 4 + 1 + 256 + 1 = 262 characters; 15 pairs = 3930 characters
    const session = big('s', 15);
    assert.equal(mergeBand(session, parseBand(`x=${'v'.repeat(4096 - 3930 - 3)};`)).toString().length, 4096);
    throwsState(() => mergeBand(session, parseBand(`x=${'v'.repeat(4096 - 3930 - 2)};`)), '22023', /4097 characters long/);
    // replacing values does not grow the band
    assert.equal(mergeBand(session, big('s', 15)).toString().length, 3930);
  });
});

describe('effectiveBand (transaction overrides session pair by pair)', () => {
  it('transaction pairs win, session pairs not overridden remain (research §1.5 example)', () => {
    const session = parseBand('PROXYUSER=cluser1;PROXYROLE=role1;app=web;');
    const tx = parseBand('PROXYROLE=role2;batch=7;');
    const eff = effectiveBand(session, tx)!;
    assert.equal(eff.toString(), 'ProxyRole=role2;batch=7;ProxyUser=cluser1;app=web;');
    assert.equal(eff.proxyUser, 'cluser1');
    assert.deepEqual(eff.proxyRole, { kind: 'role', name: 'role2' });
  });
  it('name matching is case-insensitive', () => {
    assert.equal(effectiveBand(parseBand('Job=a;'), parseBand('JOB=b;'))!.toString(), 'JOB=b;');
  });
  it('either side missing', () => {
    const b = parseBand('a=1;');
    assert.equal(effectiveBand(null, null), null);
    assert.equal(effectiveBand(b, null), b);
    assert.equal(effectiveBand(null, b), b);
  });
  it('a transaction ProxyRole=NONE overrides a session role', () => {
    const eff = effectiveBand(parseBand('ProxyUser=u;ProxyRole=r;'), parseBand('ProxyRole=NONE;'))!;
    assert.deepEqual(eff.proxyRole, { kind: 'none' });
    assert.equal(eff.proxyUser, 'u');
  });
});
