/** SQLSTATE codes the gateway itself raises. */
export const SqlState = {
  ProtocolViolation: '08P01',
  ConnectionFailure: '08006',
  ConnectionException: '08000',
  SqlclientUnableToEstablish: '08001',
  SqlserverRejectedEstablishment: '08004',
  InvalidAuthorizationSpecification: '28000',
  InvalidPassword: '28P01',
  TooManyConnections: '53300',
  InsufficientPrivilege: '42501',
  InvalidCatalogName: '3D000',
  FeatureNotSupported: '0A000',
  AdminShutdown: '57P01',
  CannotConnectNow: '57P03',
  QueryCanceled: '57014',
  ProgramLimitExceeded: '54000',
  InternalError: 'XX000',
  InvalidParameterValue: '22023',
  SyntaxError: '42601',
  InvalidSqlStatementName: '26000',
  DuplicatePreparedStatement: '42P05',
  ConfigurationLimitExceeded: '53400',
  ObjectNotInPrerequisiteState: '55000',
  ActiveSqlTransaction: '25001',
  NoActiveSqlTransaction: '25P01',
  InFailedSqlTransaction: '25P02',
} as const;

export type Severity = 'ERROR' | 'FATAL' | 'PANIC' | 'WARNING' | 'NOTICE' | 'DEBUG' | 'INFO' | 'LOG';

/** An error to be reported to a client as an ErrorResponse. */
export class PgError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly severity: Severity = 'ERROR',
    readonly detail?: string,
    readonly hint?: string,
  ) {
    super(message);
    this.name = 'PgError';
  }
}
