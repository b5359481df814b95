/** An error the gateway answers itself, with its status (CONTRACT section 8). */
export class GatewayError extends Error {
  constructor (readonly statusCode: number, message: string, readonly retryAfterSeconds?: number) {
    super(message)
    this.name = 'GatewayError'
  }
}

/** How a route family words its errors: Ollama's `{error}`, FastAPI's `detail` beside it, OpenAI's or Anthropic's envelope. */
export type ErrorStyle = 'ollama' | 'diffusion' | 'openai' | 'anthropic'

/** Anthropic's error types by status, as Ollama's Anthropic-compatible API gives them. */
function anthropicErrorType (statusCode: number): string {
  switch (statusCode) {
    case 400: return 'invalid_request_error'
    case 401: return 'authentication_error'
    case 403: return 'permission_error'
    case 404: return 'not_found_error'
    case 413: return 'request_too_large'
    case 429: return 'rate_limit_error'
    case 503: case 529: return 'overloaded_error'
    default: return statusCode < 500 ? 'invalid_request_error' : 'api_error'
  }
}

export function errorBody (style: ErrorStyle, statusCode: number, message: string): unknown {
  switch (style) {
    case 'diffusion':
      return { error: message, detail: message }
    case 'openai': {
      const type = statusCode === 404 ? 'not_found_error' : statusCode >= 500 ? 'api_error' : 'invalid_request_error'
      return { error: { message, type, param: null, code: null } }
    }
    case 'anthropic':
      return { type: 'error', error: { type: anthropicErrorType(statusCode), message } }
    default:
      return { error: message }
  }
}
