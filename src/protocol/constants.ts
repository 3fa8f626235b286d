/** PostgreSQL wire-protocol codes. Names follow the protocol documentation. */

/** Special request codes carried in the "version" field of an untyped startup-phase packet. */
export const PROTOCOL_3_0 = 196608; // 3 << 16
export const PROTOCOL_3_2 = 196610; // 3 << 16 | 2
export const CANCEL_REQUEST_CODE = 80877102;
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;

/** Frontend (client → server) message types. */
export const enum Frontend {
  Bind = 0x42, // 'B'
  Close = 0x43, // 'C'
  CopyData = 0x64, // 'd'
  CopyDone = 0x63, // 'c'
  CopyFail = 0x66, // 'f'
  Describe = 0x44, // 'D'
  Execute = 0x45, // 'E'
  Flush = 0x48, // 'H'
  FunctionCall = 0x46, // 'F'
  Parse = 0x50, // 'P'
  Password = 0x70, // 'p' (also SASLInitialResponse, SASLResponse, GSSResponse)
  Query = 0x51, // 'Q'
  Sync = 0x53, // 'S'
  Terminate = 0x58, // 'X'
}

/** Backend (server → client) message types. */
export const enum Backend {
  Authentication = 0x52, // 'R'
  BackendKeyData = 0x4b, // 'K'
  BindComplete = 0x32, // '2'
  CloseComplete = 0x33, // '3'
  CommandComplete = 0x43, // 'C'
  CopyData = 0x64, // 'd'
  CopyDone = 0x63, // 'c'
  CopyInResponse = 0x47, // 'G'
  CopyOutResponse = 0x48, // 'H'
  CopyBothResponse = 0x57, // 'W'
  DataRow = 0x44, // 'D'
  EmptyQueryResponse = 0x49, // 'I'
  ErrorResponse = 0x45, // 'E'
  FunctionCallResponse = 0x56, // 'V'
  NegotiateProtocolVersion = 0x76, // 'v'
  NoData = 0x6e, // 'n'
  NoticeResponse = 0x4e, // 'N'
  NotificationResponse = 0x41, // 'A'
  ParameterDescription = 0x74, // 't'
  ParameterStatus = 0x53, // 'S'
  ParseComplete = 0x31, // '1'
  PortalSuspended = 0x73, // 's'
  ReadyForQuery = 0x5a, // 'Z'
  RowDescription = 0x54, // 'T'
}

/** Authentication request sub-codes (Int32 after the 'R' header). */
export const enum AuthCode {
  Ok = 0,
  KerberosV5 = 2,
  CleartextPassword = 3,
  MD5Password = 5,
  GSS = 7,
  GSSContinue = 8,
  SSPI = 9,
  SASL = 10,
  SASLContinue = 11,
  SASLFinal = 12,
}

/** Transaction status byte of ReadyForQuery. */
export const enum TxStatus {
  Idle = 0x49, // 'I'
  InTransaction = 0x54, // 'T'
  Failed = 0x45, // 'E'
}
