// The admin API with the token from this tab's sessionStorage, as a bearer header.

const KEY = "gateway-admin-token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getToken() {
  return sessionStorage.getItem(KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
}

export async function api(method, path, body, { quiet401 = false } = {}) {
  const headers = { Authorization: `Bearer ${getToken()}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, `cannot reach the gateway's admin port (${error.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.ok) return data;
  const said = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
  if (response.status === 401 && !quiet401) {
    setToken(null);
    window.dispatchEvent(new CustomEvent("gateway-token-refused", {
      detail: `The gateway no longer accepts this token (401): ${said}` }));
  }
  throw new ApiError(response.status, `${method} ${path}: ${said}`);
}
