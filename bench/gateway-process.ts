/**
 * Benchmark launcher: runs one trustgate gateway in its own process so that its CPU time is its
 * own. The benchmark scripts (prepareLauncher in bench/common.ts) transpile this file to plain
 * JavaScript and run it with `node`, importing the compiled gateway from dist/ (set in
 * TRUSTGATE_GATEWAY_MODULE), so tsx is not on the hot path.
 *
 * Input: the gateway config as JSON in TRUSTGATE_BENCH_CONFIG (or argv[2]).
 * Output: one JSON line `{"port":…,"pid":…}` on stdout once listening.
 * stdin commands (one per line): `mem` prints `{"mem":{…}}` (after a GC when --expose-gc is on);
 * `stop` (or stdin closing, i.e. the parent died) stops the gateway and exits.
 */
import type * as GatewayModule from '../src/gateway.js';

const raw = process.env.TRUSTGATE_BENCH_CONFIG ?? process.argv[2];
if (!raw) {
  process.stderr.write('gateway-process: pass the config as JSON in TRUSTGATE_BENCH_CONFIG or argv[2]\n');
  process.exit(2);
}
const config = JSON.parse(raw) as Record<string, unknown>;
const modulePath = process.env.TRUSTGATE_GATEWAY_MODULE ?? new URL('../src/gateway.js', import.meta.url).href;
const { createGateway } = (await import(modulePath)) as typeof GatewayModule;

const gw = createGateway(config);
await gw.start();
process.stdout.write(`${JSON.stringify({ port: gw.address().port, pid: process.pid })}\n`);

let stopping = false;
function stop(code: number): void {
  if (stopping) return;
  stopping = true;
  const force = setTimeout(() => process.exit(code), 5000);
  force.unref();
  gw.stop(1000).then(
    () => process.exit(code),
    () => process.exit(code),
  );
}

let pending = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk: string) => {
  pending += chunk;
  let nl: number;
  while ((nl = pending.indexOf('\n')) >= 0) {
    const cmd = pending.slice(0, nl).trim();
    pending = pending.slice(nl + 1);
    if (cmd === 'mem') {
      const g = (globalThis as { gc?: () => void }).gc;
      if (g) {
        g();
        g();
      }
      process.stdout.write(`${JSON.stringify({ mem: process.memoryUsage(), clients: gw.clientCount })}\n`);
    } else if (cmd === 'stop') {
      stop(0);
    }
  }
});
process.stdin.on('end', () => stop(0));
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
