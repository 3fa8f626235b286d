/** Public library API. See docs/library.md. */
export { createGateway, Gateway, VERSION, type GatewayOptions } from './gateway.js';
export { parseConfig, loadConfig, ConfigError } from './config/load.js';
export type { Config, ConfigInput, PoolMode, SecurityMode } from './config/schema.js';
export { EmbeddedPostgres, type EmbeddedPostgresOptions } from './embedded/postgres.js';
export { makeScramVerifier } from './auth/scram.js';
export { withProxy, queryBandStatement, type ProxyRequest } from './middle-tier/with-proxy.js';
export {
  forwardSecurityMessage,
  SecuritySessionRefusal,
  authenticationSaslMessage,
  saslMechanismOf,
  type SecuritySessionCallback,
  type SecurityMessage,
  type SecuritySessionInfo,
  type ClientSide,
} from './relay/security-session.js';
export type { AuditLog, AuditStats } from './audit/audit-log.js';
export type { QueryLogInput, AccessLogInput, QueryLogRecord, AccessLogRecord, AccessEvent, QueryResult } from './audit/records.js';
