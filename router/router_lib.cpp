// moe_router library anchor
namespace moe::router { int router_lib_anchor = 0; }
