/**
 * A process that records audit records and then waits to be killed (test/audit-writer.test.ts,
 * "kill and replay"). Input: AuditSettings as JSON in argv[2], the number of records in argv[3].
 * It records them, flushes (the database is unreachable, so they go to the spool), prints one
 * JSON line `{"ids":[…],"stats":{…}}`, and sleeps until SIGKILL.
 */
import { AuditLog } from '../../src/audit/audit-log.js';
import type { AuditSettings } from '../../src/audit/settings.js';
import { createLogger } from '../../src/log/logger.js';

const settings = JSON.parse(process.argv[2]!) as AuditSettings;
const n = Number(process.argv[3]);
const audit = new AuditLog(createLogger('silent'));
audit.configure(settings);
const ids: number[] = [];
for (let i = 0; i < n; i++) {
  const now = Date.now();
  ids.push(
    i % 5 === 4
      ? audit.access({ event: 'proxy_refused', decision: 'refused', trustedUser: 'app_tier', proxyUser: `p${i}`, sqlstate: '42501', message: `refused ${i}` })
      : audit.query({ trustedUser: 'app_tier', proxyUser: 'alice', statementText: `SELECT ${i}`, statementKind: 'SELECT', startedAt: now, endedAt: now + 1, result: 'ok', rows: 1 }),
  );
}
await audit.flush();
process.stdout.write(`${JSON.stringify({ ids, stats: audit.stats() })}\n`);
setInterval(() => undefined, 60_000);
