import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { isMd5Hash, md5PasswordHash, md5Response, verifyMd5Response } from '../../src/auth/md5.js';

const SALT = Buffer.from([1, 2, 3, 4]);

test('md5PasswordHash known values', () => {
  assert.equal(md5PasswordHash('postgres', 'postgres'), 'md53175bce1d3201d16594cebf9d7eb3f9d');
  // md5("secret" + "alice"), computed with Python hashlib.
  assert.equal(md5PasswordHash('alice', 'secret'), 'md54a0a68b43b6cd5cf266fa02f196e2371');
  // UTF-8 bytes of password then user.
  assert.equal(md5PasswordHash('bób', 'pässwörd'), 'md57268a0187eec7d22c66f9b17a185ac25');
});

test('md5Response known value', () => {
  // md5("3175bce1d3201d16594cebf9d7eb3f9d" || 01 02 03 04), computed with Python hashlib.
  assert.equal(md5Response('md53175bce1d3201d16594cebf9d7eb3f9d', SALT), 'md568be9ed08db75f318087ab337aaea044');
  assert.throws(() => md5Response('3175bce1d3201d16594cebf9d7eb3f9d', SALT), TypeError);
});

test('md5Response matches node-postgres client computation', async () => {
  const utils = createRequire(import.meta.url)('pg/lib/crypto/utils.js');
  const salt = Buffer.from([0xde, 0xad, 0xbe, 0xef]);
  const fromPg: string = await utils.postgresMd5PasswordHash('app', 'p@ss', salt);
  assert.equal(md5Response(md5PasswordHash('app', 'p@ss'), salt), fromPg);
  assert.equal(verifyMd5Response(md5PasswordHash('app', 'p@ss'), salt, fromPg), true);
});

test('verifyMd5Response', () => {
  const stored = md5PasswordHash('postgres', 'postgres');
  const good = md5Response(stored, SALT);
  assert.equal(verifyMd5Response(stored, SALT, good), true);
  assert.equal(verifyMd5Response(stored, Buffer.from([1, 2, 3, 5]), good), false); // replay with other salt
  assert.equal(verifyMd5Response(md5PasswordHash('postgres', 'wrong'), SALT, good), false);
  assert.equal(verifyMd5Response(stored, SALT, good.slice(0, -1)), false); // length mismatch, no throw
  assert.equal(verifyMd5Response(stored, SALT, good.toUpperCase()), false);
  assert.equal(verifyMd5Response(stored, SALT, ''), false);
  assert.equal(verifyMd5Response('not-a-hash', SALT, good), false);
});

test('isMd5Hash', () => {
  assert.equal(isMd5Hash('md53175bce1d3201d16594cebf9d7eb3f9d'), true);
  assert.equal(isMd5Hash('md53175BCE1D3201D16594CEBF9D7EB3F9D'), false); // PostgreSQL requires lowercase
  assert.equal(isMd5Hash('md53175bce1d3201d16594cebf9d7eb3f9'), false);
  assert.equal(isMd5Hash('md53175bce1d3201d16594cebf9d7eb3f9dd'), false);
  assert.equal(isMd5Hash('SCRAM-SHA-256$4096:abc$def:ghi'), false);
  assert.equal(isMd5Hash(''), false);
});
