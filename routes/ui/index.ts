import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, extname, join } from 'node:path'
import type { FastifyPluginAsync, FastifyReply } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import { packageRoot } from '../../services/config/package-root.js'

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.svg': 'image/svg+xml'
}

interface UiFile { body: Buffer, type: string }

/** The charting library's files the Usage view loads (uPlot, a dependency: found wherever npm put it). */
const UPLOT_FILES = ['uPlot.esm.js', 'uPlot.min.css']

function uplotFolder (): string | undefined {
  try {
    return join(dirname(createRequire(join(packageRoot, 'package.json')).resolve('uplot/package.json')), 'dist')
  } catch {
    return undefined
  }
}

/**
 * The page and its style from `ui/`, its scripts as `npm run build` compiled them to `dist/ui/`,
 * and uPlot from its package.
 */
function loadFiles (): Map<string, UiFile> {
  const files = new Map<string, UiFile>()
  const add = (dir: string, name: string): void => {
    const type = TYPES[extname(name)]
    if (type !== undefined) files.set(name, { body: readFileSync(join(dir, name)), type })
  }
  const sources = join(packageRoot, 'ui')
  if (existsSync(sources)) for (const name of readdirSync(sources)) if (!name.endsWith('.ts')) add(sources, name)
  const compiled = join(packageRoot, 'dist', 'ui')
  if (existsSync(compiled)) for (const name of readdirSync(compiled)) if (name.endsWith('.js')) add(compiled, name)
  const uplot = uplotFolder()
  if (uplot !== undefined) for (const name of UPLOT_FILES) if (existsSync(join(uplot, name))) add(uplot, name)
  return files
}

/**
 * `GET /ui/`: the operator console. Its files are read once at start and served from memory; a
 * request names a file, never a path. Every URL the page uses is relative, so it works under any
 * prefix the gateway is mounted at. The page is open; what it shows comes from `/gpu/events`, and
 * changes go to the admin routes with the token the operator types in.
 */
const uiRoutes: FastifyPluginAsync = async (fastify) => {
  const files = loadFiles()
  if (!files.has('index.html') || !files.has('console.js')) {
    fastify.log.warn({ folders: ['ui', 'dist/ui'] }, 'the console\'s files are missing (npm run build; an image needs ui/ and dist/): /ui/ will not work')
  }
  const config = { auth: 'open', errorStyle: 'ollama', accessLogLevel: 'debug' } as const

  // `/ui` → `ui/`: relative, so that a prefix in front stays in front.
  fastify.get('/ui', { config }, async (_request, reply) => await reply.redirect('ui/', 308))

  const serve = async (name: string, reply: FastifyReply): Promise<FastifyReply> => {
    const file = files.get(name)
    if (file === undefined) throw new GatewayError(404, `no such file in the console: ${name.slice(0, 100)}`)
    return await reply
      .header('content-type', file.type)
      .header('cache-control', 'no-cache')
      .header('x-content-type-options', 'nosniff')
      // Nothing but this gateway: no other host is ever asked for anything.
      .header('content-security-policy', "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
      .send(file.body)
  }
  fastify.get('/ui/', { config }, async (_request, reply) => await serve('index.html', reply))
  fastify.get<{ Params: { file: string } }>('/ui/:file', { config }, async (request, reply) => await serve(request.params.file, reply))
}

export default uiRoutes
