import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import { createRequire } from 'node:module';
import {
  SCRAM_SHA_256,
  ScramClientExchange,
  ScramError,
  ScramServerExchange,
  makeScramVerifier,
  parseScramVerifier,
  type ScramSecret,
} from '../../src/auth/scram.js';

// RFC 7677 §3 test vector.
const RFC = {
  user: 'user',
  password: 'pencil',
  clientNonce: 'rOprNGfwEbeRWgbNEkqO',
  serverNonce: '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0',
  salt: 'W22ZaJ0SNY7soEsUEjb6gQ==',
  clientFirst: 'n,,n=user,r=rOprNGfwEbeRWgbNEkqO',
  serverFirst: 'r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096',
  clientFinal:
    'c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=',
  serverFinal: 'v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=',
  // Computed independently with Python hashlib (pbkdf2_hmac / hmac / sha256).
  verifier:
    'SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=',
};

const b = (s: string): Buffer => Buffer.from(s, 'utf8');
const sha256 = (d: Buffer): Buffer => createHash('sha256').update(d).digest();

function secretFor(password: string, iterations = 4096, salt?: Buffer): ScramSecret {
  const s = parseScramVerifier(makeScramVerifier(password, iterations, salt));
  assert.ok(s);
  return s;
}

/** Run a full exchange; returns what each side produced. Throws whatever a side throws. */
function exchange(server: ScramServerExchange, client: ScramClientExchange) {
  const { serverFirst } = server.handleClientFirst(b(client.clientFirst()));
  const clientFinal = client.handleServerFirst(serverFirst);
  const { serverFinal, clientKey } = server.handleClientFinal(b(clientFinal));
  client.verifyServerFinal(serverFinal);
  return { serverFirst, clientFinal, serverFinal, clientKey };
}

function assertScramError(fn: () => unknown, kind: 'auth' | 'protocol', detail?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof ScramError, `expected ScramError, got ${String(err)}`);
    assert.equal(err.kind, kind);
    if (detail) assert.match(err.detail, detail);
    // The message never says what exactly failed.
    assert.ok(['password authentication failed', 'malformed SCRAM message'].includes(err.message));
    return true;
  });
}

test('mechanism name', () => {
  assert.equal(SCRAM_SHA_256, 'SCRAM-SHA-256');
});

test('RFC 7677 vector: client side produces the exact messages', () => {
  const client = new ScramClientExchange({ password: RFC.password }, { nonce: RFC.clientNonce, user: RFC.user });
  assert.equal(client.clientFirst(), RFC.clientFirst);
  assert.equal(client.handleServerFirst(RFC.serverFirst), RFC.clientFinal);
  client.verifyServerFinal(RFC.serverFinal);
});

test('RFC 7677 vector: server side produces the exact messages', () => {
  const secret = parseScramVerifier(RFC.verifier);
  assert.ok(secret);
  const server = new ScramServerExchange(secret, { nonce: RFC.serverNonce });
  assert.equal(server.handleClientFirst(b(RFC.clientFirst)).serverFirst, RFC.serverFirst);
  const { serverFinal, clientKey } = server.handleClientFinal(b(RFC.clientFinal));
  assert.equal(serverFinal, RFC.serverFinal);
  assert.deepEqual(sha256(clientKey), secret.storedKey);
});

test('makeScramVerifier matches an independently computed verifier', () => {
  assert.equal(makeScramVerifier(RFC.password, 4096, Buffer.from(RFC.salt, 'base64')), RFC.verifier);
});

test('verifier parse/format round trip', () => {
  const text = makeScramVerifier('s3cret', 1234);
  const s = parseScramVerifier(text);
  assert.ok(s);
  assert.equal(s.iterations, 1234);
  assert.equal(s.salt.length, 16);
  assert.equal(s.storedKey.length, 32);
  assert.equal(s.serverKey.length, 32);
  assert.equal(
    `SCRAM-SHA-256$${s.iterations}:${s.salt.toString('base64')}$${s.storedKey.toString('base64')}:${s.serverKey.toString('base64')}`,
    text,
  );
  assert.deepEqual(parseScramVerifier(RFC.verifier)?.salt, Buffer.from(RFC.salt, 'base64'));
});

test('parseScramVerifier rejects other formats', () => {
  const [head, keys] = RFC.verifier.split('$').slice(1);
  for (const bad of [
    '',
    'md53175bce1d3201d16594cebf9d7eb3f9d',
    'pencil',
    RFC.verifier.replace('SCRAM-SHA-256', 'SCRAM-SHA-1'),
    RFC.verifier + '$',
    `SCRAM-SHA-256$${keys}`,
    `SCRAM-SHA-256$0:${RFC.salt}$${keys}`, // zero iterations
    `SCRAM-SHA-256$4096:$${keys}`, // empty salt
    `SCRAM-SHA-256$4096:not*base64$${keys}`,
    `SCRAM-SHA-256$${head}$${keys.split(':')[0]}:AAAA`, // ServerKey wrong length
  ]) {
    assert.equal(parseScramVerifier(bad), null, bad);
  }
});

test('makeScramVerifier rejects bad parameters', () => {
  assert.throws(() => makeScramVerifier('x', 0), RangeError);
  assert.throws(() => makeScramVerifier('x', 1.5), RangeError);
  assert.throws(() => makeScramVerifier('x', 4096, Buffer.alloc(0)), RangeError);
});

test('makeScramVerifier output verifies against ScramClientExchange with the same password', () => {
  const secret = secretFor('correct horse', 4096);
  const server = new ScramServerExchange(secret);
  const client = new ScramClientExchange({ password: 'correct horse' });
  const first = client.clientFirst();
  assert.match(first, /^n,,n=,r=[A-Za-z0-9+/=]+$/);
  const { serverFirst } = server.handleClientFirst(b(first));
  const clientNonce = first.slice('n,,n=,r='.length);
  const [r, salt, iter] = serverFirst.split(',');
  assert.ok(r.startsWith(`r=${clientNonce}`) && r.length > `r=${clientNonce}`.length);
  assert.equal(salt, `s=${secret.salt.toString('base64')}`);
  assert.equal(iter, 'i=4096');
  const clientFinal = client.handleServerFirst(serverFirst);
  assert.match(clientFinal, /^c=biws,r=[^,]+,p=[A-Za-z0-9+/]{43}=$/);
  const { serverFinal } = server.handleClientFinal(b(clientFinal));
  assert.match(serverFinal, /^v=[A-Za-z0-9+/]{43}=$/);
  client.verifyServerFinal(serverFinal);
});

test('full round trip with password (non-ASCII password uses raw UTF-8 consistently)', () => {
  for (const password of ['hunter2', 'pässwörd ☃', '']) {
    const secret = secretFor(password, 64);
    const { clientKey } = exchange(new ScramServerExchange(secret), new ScramClientExchange({ password }));
    assert.deepEqual(sha256(clientKey), secret.storedKey);
  }
});

test('passthrough: clientKey recovered by the gateway + serverKey logs in upstream', () => {
  const secret = secretFor('upstream-pass', 4096);
  // 1. Application client -> gateway (gateway holds only the verifier).
  const { clientKey } = exchange(new ScramServerExchange(secret), new ScramClientExchange({ password: 'upstream-pass' }));
  // 2. Gateway -> PostgreSQL (simulated by a second server exchange on the same verifier), no password.
  const upstream = new ScramClientExchange({ clientKey, serverKey: secret.serverKey });
  exchange(new ScramServerExchange(secret), upstream);
  // Keys are bound to salt/iterations: a verifier for the same password with another salt rejects them.
  const other = secretFor('upstream-pass', 4096);
  assertScramError(
    () => exchange(new ScramServerExchange(other), new ScramClientExchange({ clientKey, serverKey: secret.serverKey })),
    'auth',
  );
});

test('passthrough client rejects keys of the wrong size', () => {
  assert.throws(() => new ScramClientExchange({ clientKey: Buffer.alloc(31), serverKey: Buffer.alloc(32) }), RangeError);
});

test('wrong password is rejected with a generic message', () => {
  const server = new ScramServerExchange(secretFor('right'));
  const client = new ScramClientExchange({ password: 'wrong' });
  const { serverFirst } = server.handleClientFirst(b(client.clientFirst()));
  const clientFinal = client.handleServerFirst(serverFirst);
  assert.throws(
    () => server.handleClientFinal(b(clientFinal)),
    (err: unknown) =>
      err instanceof ScramError &&
      err.kind === 'auth' &&
      err.message === 'password authentication failed' &&
      /StoredKey/.test(err.detail),
  );
});

/** Set up an exchange up to the client-final-message so it can be tampered with. */
function pending(gs2 = 'n,,') {
  const secret = parseScramVerifier(RFC.verifier)!;
  const server = new ScramServerExchange(secret, { nonce: RFC.serverNonce });
  server.handleClientFirst(b(RFC.clientFirst.replace('n,,', gs2)));
  return server;
}

test('RFC client-final is accepted untampered (control for tamper tests)', () => {
  assert.equal(pending().handleClientFinal(b(RFC.clientFinal)).serverFinal, RFC.serverFinal);
});

test('tampered nonce is rejected', () => {
  const tampered = RFC.clientFinal.replace('hNlF$k0', 'hNlF$k1');
  assertScramError(() => pending().handleClientFinal(b(tampered)), 'protocol', /nonce/);
  // Client side: server nonce must extend the client nonce, and strictly.
  const c1 = new ScramClientExchange({ password: 'x' }, { nonce: 'abc' });
  c1.clientFirst();
  assertScramError(() => c1.handleServerFirst('r=abX123,s=QUJD,i=4096'), 'protocol', /nonce/);
  const c2 = new ScramClientExchange({ password: 'x' }, { nonce: 'abc' });
  c2.clientFirst();
  assertScramError(() => c2.handleServerFirst('r=abc,s=QUJD,i=4096'), 'protocol', /nonce/);
});

test('tampered channel binding is rejected', () => {
  // c=eSws is base64("y,,") but the header was "n,,".
  const yInsteadOfN = RFC.clientFinal.replace('c=biws', 'c=eSws');
  assertScramError(() => pending().handleClientFinal(b(yInsteadOfN)), 'protocol', /channel binding/);
  const garbage = RFC.clientFinal.replace('c=biws', 'c=bi*s');
  assertScramError(() => pending().handleClientFinal(b(garbage)), 'protocol', /channel binding/);
  // And the reverse: header "y,," must be answered with c=eSws.
  assertScramError(() => pending('y,,').handleClientFinal(b(RFC.clientFinal)), 'protocol', /channel binding/);
});

test('gs2 header "y,," is accepted when bound consistently with c=eSws', () => {
  const secret = secretFor('pw', 16);
  // Recover ClientKey through a normal exchange, then hand-build a "y,," client-final-message.
  const { clientKey } = exchange(new ScramServerExchange(secret), new ScramClientExchange({ password: 'pw' }));
  const server = new ScramServerExchange(secret);
  const bare = 'n=*,r=clientnonce';
  const { serverFirst } = server.handleClientFirst(b(`y,,${bare}`));
  const withoutProof = `c=eSws,r=${serverFirst.split(',')[0].slice(2)}`;
  const sig = createHmac('sha256', secret.storedKey).update(`${bare},${serverFirst},${withoutProof}`).digest();
  const proof = Buffer.from(clientKey.map((x, i) => x ^ sig[i]));
  const { serverFinal } = server.handleClientFinal(b(`${withoutProof},p=${proof.toString('base64')}`));
  assert.match(serverFinal, /^v=/);
});

test('tampered proof is rejected', () => {
  const tampered = RFC.clientFinal.replace('p=dHzb', 'p=dHzc');
  assertScramError(() => pending().handleClientFinal(b(tampered)), 'auth');
  const short = RFC.clientFinal.replace(/p=.*$/, 'p=AAAA');
  assertScramError(() => pending().handleClientFinal(b(short)), 'protocol', /proof/);
  const noProof = RFC.clientFinal.replace(/,p=.*$/, '');
  assertScramError(() => pending().handleClientFinal(b(noProof)), 'protocol', /proof/);
});

test('server rejects unsupported client-first-messages', () => {
  const secret = parseScramVerifier(RFC.verifier)!;
  const cases: Array<[string, RegExp]> = [
    ['p=tls-server-end-point,,n=,r=abc', /channel binding/],
    ['n,a=admin,n=,r=abc', /authorization identity/],
    ['x,,n=,r=abc', /flag/],
    ['n,,m=ext,n=,r=abc', /n= and r=/],
    ['n,,n=,r=', /nonce/],
    ['n,,n=user', /n= and r=/],
    ['garbage', /gs2/],
  ];
  for (const [msg, detail] of cases) {
    assertScramError(() => new ScramServerExchange(secret).handleClientFirst(b(msg)), 'protocol', detail);
  }
});

test('client validates server-first-message salt and iterations', () => {
  const cases: Array<[string, RegExp]> = [
    ['r=abcXYZ,s=QUJD,i=0', /iteration/],
    ['r=abcXYZ,s=QUJD,i=10000001', /iteration/],
    ['r=abcXYZ,s=QUJD,i=-1', /iteration/],
    ['r=abcXYZ,s=QUJD,i=abc', /iteration/],
    ['r=abcXYZ,s=,i=4096', /salt/],
    ['r=abcXYZ,s=not*b64,i=4096', /salt/],
    ['m=ext,r=abcXYZ,s=QUJD,i=4096', /r=, s= and i=/],
  ];
  for (const [msg, detail] of cases) {
    const c = new ScramClientExchange({ password: 'x' }, { nonce: 'abc' });
    c.clientFirst();
    assertScramError(() => c.handleServerFirst(msg), 'protocol', detail);
  }
  // The upper bound itself is allowed (only checked, not run: use passthrough keys so no PBKDF2).
  const c = new ScramClientExchange({ clientKey: Buffer.alloc(32), serverKey: Buffer.alloc(32) }, { nonce: 'abc' });
  c.clientFirst();
  assert.match(c.handleServerFirst('r=abcXYZ,s=QUJD,i=10000000'), /^c=biws,r=abcXYZ,p=/);
});

test('client rejects server-final errors and bad signatures', () => {
  const run = (serverFinal: string) => {
    const c = new ScramClientExchange({ password: RFC.password }, { nonce: RFC.clientNonce, user: RFC.user });
    c.clientFirst();
    c.handleServerFirst(RFC.serverFirst);
    c.verifyServerFinal(serverFinal);
  };
  run(RFC.serverFinal);
  assertScramError(() => run('e=invalid-proof'), 'auth', /invalid-proof/);
  assertScramError(() => run(RFC.serverFinal.replace('v=6rr', 'v=6rs')), 'auth', /signature/);
  assertScramError(() => run('v=AAAA'), 'auth', /signature/);
  assertScramError(() => run('x=1'), 'protocol');
});

test('out-of-order calls are rejected and a failed exchange stays failed', () => {
  const secret = parseScramVerifier(RFC.verifier)!;
  const server = new ScramServerExchange(secret);
  assertScramError(() => server.handleClientFinal(b(RFC.clientFinal)), 'protocol', /unexpected/);
  assertScramError(() => server.handleClientFirst(b(RFC.clientFirst)), 'protocol', /unexpected/);

  const client = new ScramClientExchange({ password: 'x' });
  assertScramError(() => client.handleServerFirst(RFC.serverFirst), 'protocol', /unexpected/);
  const c2 = new ScramClientExchange({ password: 'x' });
  c2.clientFirst();
  assertScramError(() => c2.clientFirst(), 'protocol');
});

test('nonce options: injected nonce validated, nonceBytes honoured', () => {
  const secret = parseScramVerifier(RFC.verifier)!;
  assert.throws(() => new ScramServerExchange(secret, { nonce: 'a,b' }), TypeError);
  assert.throws(() => new ScramClientExchange({ password: 'x' }, { nonce: '' }), TypeError);
  const c = new ScramClientExchange({ password: 'x' }, { nonceBytes: 30 });
  assert.equal(c.clientFirst().length, 'n,,n=,r='.length + 40);
  const s = new ScramServerExchange(secret, { nonceBytes: 3 });
  assert.equal(s.handleClientFirst(b('n,,n=,r=abc')).serverFirst.split(',')[0].length, 'r=abc'.length + 4);
});

test('user name is saslname-escaped by the client and ignored by the server', () => {
  const c = new ScramClientExchange({ password: 'x' }, { nonce: 'abc', user: 'a=b,c' });
  assert.equal(c.clientFirst(), 'n,,n=a=3Db=2Cc,r=abc');
  const secret = secretFor('x', 8);
  exchange(new ScramServerExchange(secret), new ScramClientExchange({ password: 'x' }, { user: 'some,one' }));
});

test('interop: node-postgres SCRAM client against ScramServerExchange', async () => {
  // pg's own client implementation (independent of ours); it sends "n,,n=*,r=…".
  const sasl = createRequire(import.meta.url)('pg/lib/crypto/sasl.js');
  const secret = secretFor('interop-pw', 4096);
  const server = new ScramServerExchange(secret);
  const session = sasl.startSession([SCRAM_SHA_256]);
  const { serverFirst } = server.handleClientFirst(b(session.response));
  await sasl.continueSession(session, 'interop-pw', serverFirst);
  const { serverFinal } = server.handleClientFinal(b(session.response));
  sasl.finalizeSession(session, serverFinal);

  const bad = sasl.startSession([SCRAM_SHA_256]);
  const server2 = new ScramServerExchange(secret);
  await sasl.continueSession(bad, 'wrong', server2.handleClientFirst(b(bad.response)).serverFirst);
  assertScramError(() => server2.handleClientFinal(b(bad.response)), 'auth');
});
