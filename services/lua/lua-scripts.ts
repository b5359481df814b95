import { existsSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { packageRoot } from '../config/package-root.js'

/**
 * The scripts that run in Redis (the lease store's, the client limits', the usage ledger's):
 * `services/lua/<name>-<numberOfKeys>.lua`, each opening
 * with a header naming its KEYS, ARGV and reply; `--- @include "includes/<file>"` lines pull in the
 * shared functions (each file once). Read once, at start.
 */
export interface LuaScript {
  name: string
  numberOfKeys: number
  lua: string
}

function luaDir (): string {
  // This file's folder: services/lua (sources, tests) and dist/services/lua (`npm run build` copies
  // the scripts beside the compiled loader, so dist/ is complete on its own, as in the container
  // image); else the package's.
  const here = dirname(fileURLToPath(import.meta.url))
  return existsSync(join(here, 'includes')) ? here : join(packageRoot, 'services', 'lua')
}

const INCLUDE = /^--- @include "([^"]+)"\s*$/gm

function expand (dir: string, source: string, seen: Set<string>): string {
  return source.replace(INCLUDE, (_, file: string) => {
    const path = join(dir, file.endsWith('.lua') ? file : `${file}.lua`)
    if (seen.has(path)) return ''
    seen.add(path)
    return expand(dir, readFileSync(path, 'utf8'), seen)
  })
}

export function loadLuaScripts (names: string[]): LuaScript[] {
  const dir = luaDir()
  return names.map((file) => {
    const match = /^(.+)-(\d+)$/.exec(file)
    if (match == null) throw new Error(`lua script name ${file} lacks its number of keys`)
    const lua = expand(dir, readFileSync(join(dir, `${file}.lua`), 'utf8'), new Set())
    return { name: match[1], numberOfKeys: Number(match[2]), lua }
  })
}
