/** The security-session callback's pure helpers: decoding the server's requests, narrowing SASL offers. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { authenticationSaslMessage, saslMechanismOf, securityMessageOf } from '../../src/relay/security-session.js';
import { authenticationMD5, authenticationSASL, authenticationSASLContinue, authenticationSASLFinal, authenticationCleartext } from '../../src/protocol/backend.js';
import { saslInitialResponse, passwordMessage } from '../../src/protocol/frontend.js';

test('SCRAM-SHA-256-PLUS is removed from the SASL offer and the message rebuilt', () => {
  const m = securityMessageOf(authenticationSASL(['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256']));
  assert.equal(m.method, 'sasl');
  assert.deepEqual(m.mechanisms, ['SCRAM-SHA-256']);
  assert.deepEqual(m.raw, authenticationSASL(['SCRAM-SHA-256']));
  assert.equal(m.expectsAnswer, true);
});

test('an offer without -PLUS is passed as received (same bytes)', () => {
  const raw = authenticationSASL(['SCRAM-SHA-256']);
  const m = securityMessageOf(raw);
  assert.equal(m.raw, raw);
});

test('an offer of only -PLUS leaves nothing to choose', () => {
  const m = securityMessageOf(authenticationSASL(['SCRAM-SHA-256-PLUS']));
  assert.deepEqual(m.mechanisms, []);
  assert.deepEqual(m.raw, authenticationSASL([]));
});

test('methods and whether the client answers', () => {
  assert.equal(securityMessageOf(authenticationMD5(Buffer.from([1, 2, 3, 4]))).method, 'md5');
  assert.equal(securityMessageOf(authenticationCleartext()).method, 'cleartext');
  assert.equal(securityMessageOf(authenticationSASLContinue('r=abc,s=xyz,i=4096')).method, 'sasl-continue');
  const final = securityMessageOf(authenticationSASLFinal('v=abc'));
  assert.equal(final.method, 'sasl-final');
  assert.equal(final.expectsAnswer, false);
});

test('authenticationSaslMessage builds the same bytes as the server encoder', () => {
  assert.deepEqual(authenticationSaslMessage(['SCRAM-SHA-256']), authenticationSASL(['SCRAM-SHA-256']));
});

test('saslMechanismOf names the mechanism of a SASLInitialResponse, null otherwise', () => {
  assert.equal(saslMechanismOf(saslInitialResponse('SCRAM-SHA-256', 'n,,n=,r=abc')), 'SCRAM-SHA-256');
  assert.equal(saslMechanismOf(passwordMessage('md5deadbeef')), null);
  assert.equal(saslMechanismOf(Buffer.from([0x70, 0, 0, 0])), null);
});
