/** psql driven like a person at a terminal: start a long query, then press Ctrl-C. */
import { execFile, spawn } from 'node:child_process';
import type { EmbeddedPostgres } from './postgres.js';

/**
 * Runs `psql <args> -c 'select pg_sleep(30)'`, waits until the query is active on the server (seen
 * through `server`), sends SIGINT and returns psql's exit code, stderr and how long the cancel took.
 */
export async function interruptPsqlSleep(
  args: string[],
  password: string,
  server: EmbeddedPostgres,
): Promise<{ code: number | null; stderr: string; cancelMs: number }> {
  const child = spawn('psql', ['-X', ...args, '-c', 'select pg_sleep(30)'], {
    env: { ...process.env, PGPASSWORD: password, PGCONNECT_TIMEOUT: '5' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const killer = setTimeout(() => child.kill('SIGKILL'), 15_000);
  try {
    for (let i = 0; i < 100; i++) {
      const rows = await server.query(`select 1 from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'`);
      if (rows.length > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const started = Date.now();
    child.kill('SIGINT');
    const code = await exited;
    return { code, stderr, cancelMs: Date.now() - started };
  } finally {
    clearTimeout(killer);
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program (psql, pgbench) with a hard timeout; never rejects for a non-zero exit. */
export function run(cmd: string, args: string[], env: Record<string, string>, timeoutMs: number): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { env: { ...process.env, PGCONNECT_TIMEOUT: '5', ...env }, timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        if (err && (err as NodeJS.ErrnoException).code === 'ENOENT') {
          reject(err);
          return;
        }
        if (err && err.killed) {
          reject(new Error(`${cmd} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
          return;
        }
        const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      },
    );
  });
}
