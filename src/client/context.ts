/** What a client session needs from the gateway around it (kept narrow to avoid cycles). */
import type tls from 'node:tls';
import type { Config } from '../config/schema.js';
import type { Logger } from '../log/logger.js';
import type { CancelRegistry } from './cancel-registry.js';
import type { SecretStore } from '../auth/secrets.js';
import type { Pool } from '../pool/pool.js';
import type { ServerConnection } from '../server/server-connection.js';
import type { ClientSession } from './session.js';
import type { RulesStore } from '../trust/rules-store.js';
import type { AuditLog } from '../audit/audit-log.js';
import type { SecurityMode } from '../config/schema.js';
import type { PrologueOptions, PrologueResult } from './prologue.js';
import type { SecuritySessionCallback } from '../relay/security-session.js';
import type { ServerEndpoint } from '../server/server-connection.js';

export interface SessionContext {
  readonly config: Config;
  readonly log: Logger;
  readonly cancels: CancelRegistry;
  readonly secrets: SecretStore;
  readonly tlsContext: tls.SecureContext | null;
  readonly draining: boolean;
  readonly adminDatabase: string;
  /** Counts the client against max_client_connections; false when full. */
  admitClient(session: ClientSession): boolean;
  sessionClosed(session: ClientSession): void;
  poolFor(database: string, user: string): Pool;
  /** CONNECT THROUGH rules of the server database behind `pool`. */
  rulesFor(pool: Pool): RulesStore;
  /** Which database secrets for admin-console users are looked up in. */
  secretsDatabase(database: string): string;
  adminParameters(): Map<string, string>;
  runAdminCommand(sql: string, session: ClientSession): Buffer;
  /** Sends a CancelRequest for `server` on a new connection. */
  sendCancel(server: ServerConnection): void;
  /** Query log and access log (src/audit/audit-log.ts): record requests and privilege decisions. */
  readonly audit: AuditLog;
  /** Sends a CancelRequest with this key to an endpoint (relayed sessions: the server's own key). */
  sendCancelTo(endpoint: Pick<ServerEndpoint, 'host' | 'port'>, processId: number, secretKey: Buffer): void;
  /** A cancel key the gateway did not issue: sent to the servers of live passthrough sessions; returns how many. */
  forwardUnknownCancel(processId: number, secretKey: Buffer): number;
  /** The security mode of a (database, user) route after TLS was settled: pooled or relay. */
  securityFor(database: string, user: string): SecurityMode;
  /** The server and its database name behind a client database name. */
  serverFor(database: string): { endpoint: ServerEndpoint; dbname: string };
  /** The embedder's security-session callback (relay mode). */
  readonly securitySession: SecuritySessionCallback;
  prologueOptions(): PrologueOptions;
  /** Takes over a connection the prologue routed to TLS passthrough. */
  startPassthrough(result: Extract<PrologueResult, { kind: 'passthrough' }>): void;
}
