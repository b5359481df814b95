/** An error the gateway answers itself, with its status (CONTRACT section 8). */
export class GatewayError extends Error {
  constructor (readonly statusCode: number, message: string, readonly retryAfterSeconds?: number) {
    super(message)
    this.name = 'GatewayError'
  }
}

/** How a route family words its errors: Ollama's `{error}`, FastAPI's `detail` beside it, or OpenAI's envelope. */
export type ErrorStyle = 'ollama' | 'diffusion' | 'openai'

export function errorBody (style: ErrorStyle, statusCode: number, message: string): unknown {
  switch (style) {
    case 'diffusion':
      return { error: message, detail: message }
    case 'openai': {
      const type = statusCode === 404 ? 'not_found_error' : statusCode >= 500 ? 'api_error' : 'invalid_request_error'
      return { error: { message, type, param: null, code: null } }
    }
    default:
      return { error: message }
  }
}
