/** The CLI: config check errors name the key; start + SIGHUP reload + SIGTERM drain. */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { stringify } from 'yaml';
import { preparePostgres, AUTH_ENV, AUTH_PASSWORD, AUTH_ROLE, USERS } from './helpers/stack.js';
import { findFreePort, type EmbeddedPostgres } from './helpers/postgres.js';

const CLI = ['--import', 'tsx', path.resolve('src/cli/main.ts')];

function runCli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [...CLI, ...args], { env: { ...process.env, ...env }, timeout: 30_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

describe('trustgate CLI', () => {
  let pgServer: EmbeddedPostgres;
  let dir: string;
  before(async () => {
    pgServer = await preparePostgres();
    dir = mkdtempSync(path.join(os.tmpdir(), 'trustgate-cli-'));
  });
  after(async () => {
    await pgServer?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('check reports invalid keys by name and exits 2', async () => {
    const file = path.join(dir, 'bad.yaml');
    writeFileSync(file, 'pool:\n  mode: sometimes\n  default_size: 0\nlisten:\n  port: 99999\nunknown_key: 1\n');
    const r = await runCli(['check', '--config', file]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /pool\.mode/);
    assert.match(r.stderr, /pool\.default_size/);
    assert.match(r.stderr, /listen\.port/);
    assert.match(r.stderr, /unknown_key/);
    const ok = path.join(dir, 'ok.yaml');
    writeFileSync(ok, 'pool:\n  mode: session\n');
    const r2 = await runCli(['check', '--config', ok, '--listen-port', '7777']);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /listen 127\.0\.0\.1:7777.*pool mode session/);
  });

  test('start serves clients; SIGHUP reloads without dropping them; SIGTERM drains and exits 0', async () => {
    const port = await findFreePort();
    const file = path.join(dir, 'trustgate.yaml');
    const config = (size: number) => ({
      listen: { host: '127.0.0.1', port },
      server: { host: pgServer.host, port: pgServer.port, tls: { mode: 'disable' } },
      auth: { user: AUTH_ROLE, password_env: AUTH_ENV, database: 'postgres' },
      pool: { mode: 'transaction', default_size: size },
    });
    writeFileSync(file, stringify(config(2)));
    const child = spawn(process.execPath, [...CLI, 'start', '--config', file], { env: { ...process.env, [AUTH_ENV]: AUTH_PASSWORD }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      for (let i = 0; i < 100 && !out.includes('trustgate listening'); i++) await new Promise((r) => setTimeout(r, 100));
      assert.match(out, /trustgate listening/);
      const client = new pg.Client({ host: '127.0.0.1', port, user: 'app', password: USERS.app, database: 'postgres' });
      await client.connect();
      assert.equal((await client.query('select 1 as one')).rows[0].one, 1);
      writeFileSync(file, stringify(config(5)));
      child.kill('SIGHUP');
      for (let i = 0; i < 50 && !out.includes('configuration reloaded'); i++) await new Promise((r) => setTimeout(r, 100));
      assert.match(out, /configuration reloaded/);
      assert.equal((await client.query('select 2 as two')).rows[0].two, 2, 'client survived the reload');
      // A broken file on reload keeps the old configuration.
      writeFileSync(file, 'pool: { mode: nope }\n');
      child.kill('SIGHUP');
      for (let i = 0; i < 50 && !out.includes('reload failed'); i++) await new Promise((r) => setTimeout(r, 100));
      assert.match(out, /reload failed/);
      assert.equal((await client.query('select 3 as three')).rows[0].three, 3);
      client.on('error', () => undefined);
      child.kill('SIGTERM');
      assert.equal(await exited, 0);
      assert.match(out, /trustgate stopped/);
    } finally {
      child.kill('SIGKILL');
    }
  });
});
